"""TLS, snappy, deflate and AUTH on the embedded broker, as nsqd has them, with pynsq as the client.

Every test runs on the embedded broker and, where an nsqd binary is found,
on nsqd started with the same flags (the test's id ends in ``[embedded]`` or
``[nsqd]``), so both are shown to behave alike. The certificates are made
by the test (a CA, a server certificate for 127.0.0.1, a client certificate
the CA signed and a self-signed one); the auth server is ``authserver``.

That a feature was not only negotiated but used is shown twice: the broker's
``/stats`` entry of the client says so, and a proxy between pynsq and the
broker keeps every byte each way, in which the message (a long, compressible
body) must not appear; compressed, the bytes carrying it must be fewer than
the body's.

With ``--tls-required=true`` nsqd's plain HTTP API refuses every request
(403 TLS_REQUIRED); tests that read ``/stats`` use ``tcp-https``, which
requires TLS of TCP clients only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import errno
import functools
import ipaddress
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nsq
import pytest
from authserver import AuthServer, allow, grant
from nsq import deflate_socket, event, snappy_socket
from rawnsq import RawConnection

from almanet._speedups.frames import ResponseFrame, encode_auth, encode_identify, encode_pub
from almanet.broker import Broker, BrokerOptions
from almanet.broker.nsqd import broker_process, find_nsqd, nsqd_process
from almanet.cli import _add_option_flags
from almanet.nsq import Producer
from almanet.pytest_plugin import broker_in_thread
from almanet.wire.protocol import MAGIC_V2, OK

x509 = pytest.importorskip("cryptography.x509")
hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")
NameOID = pytest.importorskip("cryptography.x509.oid").NameOID
ExtendedKeyUsageOID = pytest.importorskip("cryptography.x509.oid").ExtendedKeyUsageOID

# Long enough for a loaded CI machine; waits that succeed return at once.
TIMEOUT = 10.0
CLIENT_COMMON_NAME = "secure-client"
SECRET = "open sesame"
# Compressible and long: compressed, it takes far fewer bytes than itself.
BODY_PATTERN = b"almanet would rather not be read on the wire. "


# --- certificates ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str  # signed by the CA
    client_key: str
    stranger_cert: str  # self-signed
    stranger_key: str


def _name(common_name: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    directory: Path,
    stem: str,
    common_name: str,
    *,
    issuer: tuple[Any, Any] | None,
    ca: bool = False,
    usage: Any = None,
    addresses: list[Any] | None = None,
) -> tuple[Any, Any]:
    """A key and certificate written to ``directory/stem.{key,pem}``; self-signed without ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (_name(common_name), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if addresses:
        builder = builder.add_extension(x509.SubjectAlternativeName(addresses), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("certificates")
    ca = _issue(directory, "ca", "almanet test CA", issuer=None, ca=True)
    server_names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    _issue(directory, "server", "127.0.0.1", issuer=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, addresses=server_names)
    _issue(directory, "client", CLIENT_COMMON_NAME, issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _issue(directory, "stranger", "stranger", issuer=None, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "stranger.pem", "stranger.key")
    return Certificates(*(str(directory / name) for name in names))


def tls_options(certificates: Certificates, client_certificate: str = "") -> dict[str, Any]:
    """pynsq's ``tls_options`` (tornado's ssl_options): trust the test CA, check the host, maybe a certificate."""
    options: dict[str, Any] = {"ssl_version": ssl.PROTOCOL_TLS_CLIENT, "ca_certs": certificates.ca}
    if client_certificate == "client":
        options.update(certfile=certificates.client_cert, keyfile=certificates.client_key)
    elif client_certificate == "stranger":
        options.update(certfile=certificates.stranger_cert, keyfile=certificates.stranger_key)
    return options


def server_tls(certificates: Certificates) -> dict[str, Any]:
    return {"tls_cert": certificates.server_cert, "tls_key": certificates.server_key}


# --- brokers ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Running:
    tcp_address: str
    http_address: str


@pytest.fixture(params=["embedded", "nsqd"])
def kind(request: pytest.FixtureRequest) -> str:
    """The broker each test starts: the embedded one, and nsqd with the same flags where it is found."""
    if request.param == "nsqd" and find_nsqd() is None:
        pytest.skip("needs an nsqd binary to start (ALMANET_NSQD or PATH)")
    return str(request.param)


def _flag(name: str, value: Any) -> str:
    """nsqd's spelling of a BrokerOptions setting."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"-{name.replace('_', '-')}={text}"


@contextlib.contextmanager
def secure_broker(kind: str, **settings: Any) -> Iterator[Running]:
    """The broker ``kind`` with ``settings`` (BrokerOptions fields, as nsqd flags for nsqd), on free ports."""
    if kind == "embedded":
        with broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", **settings) as broker:
            yield Running(broker.tcp_address, broker.http_address)
        return
    executable = find_nsqd()
    assert executable is not None
    with nsqd_process(executable, *(_flag(name, value) for name, value in settings.items())) as (tcp, http):
        yield Running(tcp, http)


def stats(http_address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{http_address}/stats?format=json", timeout=TIMEOUT) as response:
        report: dict[str, Any] = json.load(response)
        return report


async def client_entry(http_address: str, hostname: str) -> dict[str, Any]:
    """The ``/stats`` entry of the client that IDENTIFYed with ``hostname`` (a producer or a consumer)."""
    report = await asyncio.to_thread(stats, http_address)
    entries = list(report["producers"] or [])
    for topic in report["topics"] or []:
        for channel in topic["channels"]:
            entries.extend(channel["clients"] or [])
    found = [entry for entry in entries if entry["hostname"] == hostname]
    assert found, f"no client {hostname} in {entries}"
    return found[0]


# --- the wire --------------------------------------------------------------------


class Wiretap:
    """A TCP proxy in front of the broker that keeps every byte it passes, each way."""

    def __init__(self, target: str) -> None:
        self._target = target
        self.to_broker = bytearray()
        self.from_broker = bytearray()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.address = ""

    async def __aenter__(self) -> Wiretap:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self._target.rpartition(":")
        broker_reader, broker_writer = await asyncio.open_connection(host, int(port))
        for pump in (
            self._pump(reader, broker_writer, self.to_broker),
            self._pump(broker_reader, writer, self.from_broker),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await reader.read(65536):
                record += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


# --- pynsq -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def pynsq_reads_partial_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work around pynsq's compressed sockets, which fail a read that decodes to nothing yet.

    They raise ``socket.error(EWOULDBLOCK)``, a bare OSError that tornado takes for
    a broken connection ("error on read: 11"), not the BlockingIOError it means. A
    read holds part of a snappy chunk or deflate block whenever the stream is cut
    there: over TLS a read is one record, and nsqd writes a snappy chunk's header
    and data, and deflate's sync flush, in writes (so records) of their own; over
    TCP it depends on timing. The embedded broker writes each flush at once.
    """
    for socket_class in (snappy_socket.SnappySocket, deflate_socket.DeflateSocket):

        def _recv(self: Any, size: int, method: Any, original: Any = socket_class._recv) -> bytes:
            try:
                data: bytes = original(self, size, method)
            except BlockingIOError:
                raise
            except OSError as error:
                if error.args == (errno.EWOULDBLOCK,):
                    raise BlockingIOError(errno.EWOULDBLOCK, "nothing decoded yet") from None
                raise
            return data

        monkeypatch.setattr(socket_class, "_recv", _recv)


_EVENTS = (
    event.READY,
    event.ERROR,
    event.CLOSE,
    event.RESPONSE,
    event.MESSAGE,
    event.IDENTIFY_RESPONSE,
    event.AUTH_RESPONSE,
)


class Pynsq:
    """One pynsq connection (``nsq.AsyncConn``, on the test's loop), its events awaited in order."""

    def __init__(self, address: str, **settings: Any) -> None:
        host, _, port = address.rpartition(":")
        self.hostname = f"secure-{uuid.uuid4().hex[:12]}"  # finds its /stats entry
        self.conn = nsq.AsyncConn(host, int(port), timeout=TIMEOUT, hostname=self.hostname, **settings)
        self._events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        for name in _EVENTS:
            self.conn.on(name, functools.partial(self._record, name))
        self.negotiated: dict[str, Any] = {}
        self.auth: dict[str, Any] = {}

    def _record(self, name: str, **kwargs: Any) -> None:
        self._events.put_nowait((name, kwargs))

    async def until(self, wanted: str) -> dict[str, Any]:
        """The next ``wanted`` event's arguments; an error or close before it fails the test."""
        while True:
            name, kwargs = await asyncio.wait_for(self._events.get(), TIMEOUT)
            if name == event.IDENTIFY_RESPONSE:
                self.negotiated = kwargs["data"]
            elif name == event.AUTH_RESPONSE:
                self.auth = kwargs["data"]
            if name == wanted:
                return kwargs
            if name in (event.ERROR, event.CLOSE):
                raise AssertionError(f"pynsq: {name} {kwargs.get('error')!r} while waiting for {wanted}")

    @classmethod
    async def connected(cls, address: str, **settings: Any) -> Pynsq:
        """Connected, IDENTIFY answered, upgrades made, AUTH answered if asked: pynsq is ready."""
        client = cls(address, **settings)
        client.conn.connect()
        await client.until(event.READY)
        return client

    async def failure(self) -> str:
        """The error pynsq reports (a broker's error frame, or a failed upgrade), then the connection's close."""
        kwargs = await self._next_of(event.ERROR)
        error = kwargs["error"]
        text = error.args[0] if error.args else error
        await self._next_of(event.CLOSE)
        return text.decode() if isinstance(text, bytes) else str(text)

    async def refused(self) -> None:
        """The connection closes before pynsq is ready (a TLS handshake the broker refused)."""
        while True:
            name, _ = await asyncio.wait_for(self._events.get(), TIMEOUT)
            assert name != event.READY, "the broker took the connection"
            if name == event.CLOSE:
                return

    async def _next_of(self, wanted: str) -> dict[str, Any]:
        while True:
            name, kwargs = await asyncio.wait_for(self._events.get(), TIMEOUT)
            if name == wanted:
                return kwargs

    async def pub(self, topic: str, body: bytes) -> None:
        self.conn.send(nsq.protocol.pub(topic, body))
        assert (await self.until(event.RESPONSE))["data"] == b"OK"

    async def subscribe(self, topic: str, channel: str = "ch") -> None:
        self.conn.send(nsq.protocol.subscribe(topic, channel))
        assert (await self.until(event.RESPONSE))["data"] == b"OK"
        self.conn.send_rdy(1)

    async def message(self) -> bytes:
        message = (await self.until(event.MESSAGE))["message"]
        message.finish()
        body: bytes = message.body
        return body

    async def close(self) -> None:
        if not self.conn.closed():
            self.conn.close()
            await self._next_of(event.CLOSE)


@contextlib.asynccontextmanager
async def pynsq(address: str, **settings: Any) -> AsyncIterator[Pynsq]:
    client = await Pynsq.connected(address, **settings)
    try:
        yield client
    finally:
        await client.close()


def new_topic() -> str:
    return f"secure.{uuid.uuid4().hex[:12]}"


def new_body() -> bytes:
    return BODY_PATTERN * 400 + uuid.uuid4().hex.encode()


# --- TLS, snappy, deflate: negotiated and used -------------------------------------

FEATURES: dict[str, dict[str, Any]] = {
    "tls": {"tls_v1": True},
    "snappy": {"snappy": True},
    "deflate": {"deflate": True, "deflate_level": 3},
    "tls+snappy": {"tls_v1": True, "snappy": True},
    "tls+deflate": {"tls_v1": True, "deflate": True, "deflate_level": 3},
}


async def test_plaintext_shows_the_message_on_the_wire(kind: str, certificates: Certificates) -> None:
    # The control: what the other tests show absent is there without the features.
    with secure_broker(kind, **server_tls(certificates)) as broker:
        async with (
            Wiretap(broker.tcp_address) as wire,
            pynsq(wire.address) as producer,
            pynsq(wire.address) as consumer,
        ):
            topic, body = new_topic(), new_body()
            await consumer.subscribe(topic)
            await producer.pub(topic, body)
            assert await consumer.message() == body
            entry = await client_entry(broker.http_address, producer.hostname)
    assert (entry["tls"], entry["snappy"], entry["deflate"]) == (False, False, False)
    assert body in wire.to_broker
    assert body in wire.from_broker


@pytest.mark.parametrize("feature", list(FEATURES))
async def test_a_feature_is_negotiated_and_used(kind: str, certificates: Certificates, feature: str) -> None:
    settings = dict(FEATURES[feature])
    tls = settings.get("tls_v1", False)
    if tls:
        settings["tls_options"] = tls_options(certificates)
    with secure_broker(kind, **server_tls(certificates)) as broker:
        async with (
            Wiretap(broker.tcp_address) as wire,
            pynsq(wire.address, **settings) as producer,
            pynsq(wire.address, **settings) as consumer,
        ):
            for key in ("tls_v1", "snappy", "deflate"):
                assert producer.negotiated[key] is settings.get(key, False), (key, producer.negotiated)
            topic, body = new_topic(), new_body()
            await consumer.subscribe(topic)
            before = (len(wire.to_broker), len(wire.from_broker))
            await producer.pub(topic, body)
            assert await consumer.message() == body
            sent = (len(wire.to_broker) - before[0], len(wire.from_broker) - before[1])
            await producer.pub(topic, b"and again")  # the streams go on after the first message
            assert await consumer.message() == b"and again"
            entries = [await client_entry(broker.http_address, client.hostname) for client in (producer, consumer)]
    for entry in entries:
        assert entry["tls"] is tls
        assert entry["snappy"] is settings.get("snappy", False)
        assert entry["deflate"] is settings.get("deflate", False)
        if tls:
            assert entry["tls_version"] == "TLS1.3"
            # nsqd v1.3.0 names no TLS 1.3 suite: "Unknown 4865" (the one each side picks may differ).
            assert entry["tls_cipher_suite"].startswith("Unknown 486")
            assert entry["tls_negotiated_protocol_is_mutual"] is True
    assert body not in wire.to_broker
    assert body not in wire.from_broker
    if not tls:
        # Compressed: the message took fewer bytes each way than its body (the PUB and the delivery).
        assert sent[0] < len(body) // 4 and sent[1] < len(body) // 4, (sent, len(body))
    if "snappy" in feature and not tls:
        stream_identifier = b"\xff\x06\x00\x00sNaPpY"
        assert stream_identifier in wire.to_broker and stream_identifier in wire.from_broker


async def test_snappy_and_deflate_together_are_refused(kind: str, certificates: Certificates) -> None:
    with secure_broker(kind) as broker:
        client = Pynsq(broker.tcp_address, snappy=True, deflate=True)
        client.conn.connect()
        assert await client.failure() == "E_IDENTIFY_FAILED cannot enable both deflate and snappy compression"


@pytest.mark.parametrize("feature", ["snappy", "deflate"])
async def test_a_corrupt_compressed_stream_closes_the_connection(kind: str, feature: str) -> None:
    with secure_broker(kind) as broker:
        host, _, port = broker.tcp_address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(MAGIC_V2 + encode_identify({"feature_negotiation": True, feature: True}))
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), TIMEOUT), "big")
        answer = await asyncio.wait_for(reader.readexactly(size), TIMEOUT)  # the frame type, then JSON
        assert json.loads(answer[4:])[feature] is True
        writer.write(b"\x00\x10\x00\x00" + b"\xee" * 64)  # neither a snappy chunk nor a deflate block
        with contextlib.suppress(ConnectionResetError):  # closed with the garbage unread
            while await asyncio.wait_for(reader.read(65536), TIMEOUT):  # its OK, compressed, then the end
                pass
        writer.close()


@contextlib.contextmanager
def broker_apart(kind: str) -> Iterator[str]:
    """The broker ``kind`` in a process of its own (the embedded one as ``almanet broker``, as it runs: in the test's
    process, the test's client would wait for the GIL); its TCP address."""
    if kind == "nsqd":
        with secure_broker(kind) as broker:
            yield broker.tcp_address
        return
    command = [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0"]
    with broker_process(command) as (tcp_address, _):
        yield tcp_address


async def test_a_deflate_bomb_of_nops_stalls_no_other_client(kind: str, topic: str) -> None:
    """15 KB that inflate to 15 MiB of NOPs (4 million commands): run a few thousand a loop iteration, as nsqd's
    goroutines share its cores, not all at once (about 0.8 s on the embedded broker before)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"NOP\n" * (15 * 1024 * 1024 // 4)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 16 * 1024
    with broker_apart(kind) as tcp_address:
        host, _, port = tcp_address.rpartition(":")
        async with Producer(tcp_address) as other:
            await other.publish(topic, b"before")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(MAGIC_V2 + encode_identify({"feature_negotiation": True, "deflate": True}))
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), TIMEOUT), "big")
            assert json.loads((await asyncio.wait_for(reader.readexactly(size), TIMEOUT))[4:])["deflate"] is True
            writer.write(bomb)
            worst = 0.0
            for _ in range(100):
                started = time.monotonic()
                await asyncio.wait_for(other.publish(topic, b"during"), TIMEOUT)
                worst = max(worst, time.monotonic() - started)
                await asyncio.sleep(0.01)
            writer.close()
    assert worst < 0.3


async def test_disabled_features_are_not_negotiated(kind: str, certificates: Certificates) -> None:
    # No certificate: no TLS; --snappy=false, --deflate=false: no compression; the client goes on without.
    with secure_broker(kind, snappy=False, deflate=False, max_deflate_level=4) as broker:
        async with pynsq(broker.tcp_address, tls_v1=True, snappy=True) as client:
            await client.pub(new_topic(), b"plain")
        async with pynsq(broker.tcp_address, deflate=True, deflate_level=9) as other:
            pass
    assert (client.negotiated["tls_v1"], client.negotiated["snappy"]) == (False, False)
    assert (other.negotiated["deflate"], other.negotiated["deflate_level"]) == (False, 4)


async def test_deflate_level_is_the_clients_capped_by_the_brokers(kind: str, certificates: Certificates) -> None:
    with secure_broker(kind, max_deflate_level=4) as broker:
        async with pynsq(broker.tcp_address, deflate=True, deflate_level=9) as client:
            topic = new_topic()
            await client.pub(topic, b"compressed at 4")
        async with pynsq(broker.tcp_address, deflate=True, deflate_level=2) as low:
            await low.pub(topic, b"compressed at 2")
    assert (client.negotiated["deflate"], client.negotiated["deflate_level"]) == (True, 4)
    assert (low.negotiated["deflate"], low.negotiated["deflate_level"]) == (True, 2)


# --- TLS policy ------------------------------------------------------------------


async def test_tls_required_refuses_a_plaintext_pub(kind: str, certificates: Certificates) -> None:
    with secure_broker(kind, tls_required="tcp-https", **server_tls(certificates)) as broker:
        async with pynsq(broker.tcp_address) as plain:
            assert plain.negotiated["tls_v1"] is False
            plain.conn.send(nsq.protocol.pub(new_topic(), b"in the clear"))
            assert await plain.failure() == "E_INVALID cannot PUB in current state (TLS required)"
        async with pynsq(broker.tcp_address, tls_v1=True, tls_options=tls_options(certificates)) as secure:
            await secure.pub(new_topic(), b"encrypted")


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        (b"PUB not!valid\n", b"PUB"),  # refused before the topic is checked, and before a body comes
        (b"AUTH\n", b"AUTH"),
        (b"NOPE\n", b"NOPE"),  # even an unknown command
    ],
)
async def test_tls_required_refuses_a_command_as_its_line_comes(
    kind: str, certificates: Certificates, line: bytes, refused: bytes
) -> None:
    with secure_broker(kind, tls_required="tcp-https", **server_tls(certificates)) as broker:
        connection = await RawConnection.open(broker.tcp_address)
        connection.send(line)
        assert (
            await connection.error_then_closed() == b"E_INVALID cannot " + refused + b" in current state (TLS required)"
        )


async def test_tls_required_refuses_the_http_api(kind: str, certificates: Certificates) -> None:
    # --tls-required=true covers nsqd's HTTP API too; there is no HTTPS listener here.
    with (
        secure_broker(kind, tls_required=True, **server_tls(certificates)) as broker,
        pytest.raises(urllib.error.HTTPError) as refused,
    ):
        stats(broker.http_address)
    assert refused.value.code == 403
    assert json.loads(refused.value.read())["message"] == "TLS_REQUIRED"


@pytest.mark.parametrize("certificate", ["", "stranger"])
async def test_require_verify_refuses_a_client_without_a_good_certificate(
    kind: str, certificates: Certificates, certificate: str
) -> None:
    settings = {
        "tls_client_auth_policy": "require-verify",
        "tls_root_ca_file": certificates.ca,
        "tls_required": "tcp-https",
        **server_tls(certificates),
    }
    with secure_broker(kind, **settings) as broker:
        refused = Pynsq(broker.tcp_address, tls_v1=True, tls_options=tls_options(certificates, certificate))
        refused.conn.connect()
        # With TLS 1.3 the client may finish its side of the handshake before the broker refuses it.
        await refused.refused()
        async with pynsq(broker.tcp_address, tls_v1=True, tls_options=tls_options(certificates, "client")) as accepted:
            await accepted.pub(new_topic(), b"from a known client")
            entry = await client_entry(broker.http_address, accepted.hostname)
    assert entry["tls"] is True


async def test_tls_min_version_refuses_an_older_client(kind: str, certificates: Certificates) -> None:
    with secure_broker(kind, tls_min_version="tls1.3", **server_tls(certificates)) as broker:
        refused = Pynsq(broker.tcp_address, tls_v1=True, tls_options=tls_options(certificates))
        _limit_to_tls12(refused)
        refused.conn.connect()
        assert "failed to upgrade to TLS" in await refused.failure()
        async with pynsq(broker.tcp_address, tls_v1=True, tls_options=tls_options(certificates)) as modern:
            await modern.pub(new_topic(), b"TLS 1.3")


def _limit_to_tls12(client: Pynsq) -> None:
    """Make pynsq's TLS upgrade offer TLS 1.2 at most (tornado's ssl_options cannot say so)."""
    conn = client.conn
    upgrade = conn.upgrade_to_tls

    def upgrade_to_tls12(options: dict[str, Any] | None = None) -> None:
        stream = conn.stream
        start_tls = stream.start_tls

        def start_tls12(server_side: bool, ssl_options: Any, server_hostname: str | None = None) -> Any:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(ssl_options["ca_certs"])
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            return start_tls(server_side, ssl_options=context, server_hostname=server_hostname)

        stream.start_tls = start_tls12
        upgrade(options)

    conn.upgrade_to_tls = upgrade_to_tls12


# --- AUTH ------------------------------------------------------------------------


async def test_auth_grants_per_topic_permissions(kind: str, certificates: Certificates) -> None:
    topic = new_topic()
    answer = grant(
        "tester",
        allow(rf"^{topic}$", channels=("^ch$", "^$")),  # publishing is checked against the channel ""
        allow(r"^open\.", permissions=("subscribe",)),
        identity_url="https://example.invalid/tester",
    )
    with AuthServer({SECRET: answer}) as auth, secure_broker(kind, auth_http_address=auth.address) as broker:
        async with pynsq(broker.tcp_address, auth_secret=SECRET) as producer:
            assert producer.negotiated["auth_required"] is True
            assert producer.auth == {
                "identity": "tester",
                "identity_url": "https://example.invalid/tester",
                "permission_count": 2,
            }
            await producer.pub(topic, b"allowed")
            entry = await client_entry(broker.http_address, producer.hostname)
            async with pynsq(broker.tcp_address, auth_secret=SECRET) as consumer:
                await consumer.subscribe(topic, "ch")
                assert await consumer.message() == b"allowed"
            producer.conn.send(nsq.protocol.pub("denied.topic", b"refused"))
            assert await producer.failure() == 'E_UNAUTHORIZED AUTH failed for PUB on "denied.topic" ""'
        async with pynsq(broker.tcp_address, auth_secret=SECRET) as subscriber:
            # open.* may be subscribed to, not published to.
            subscriber.conn.send(nsq.protocol.subscribe("open.news", "other"))
            assert (await subscriber.until(event.RESPONSE))["data"] == b"OK"
        async with pynsq(broker.tcp_address, auth_secret=SECRET) as other:
            other.conn.send(nsq.protocol.subscribe(topic, "other"))
            assert await other.failure() == f'E_UNAUTHORIZED AUTH failed for SUB on "{topic}" "other"'
        async with pynsq(broker.tcp_address, auth_secret=SECRET) as publisher:
            publisher.conn.send(nsq.protocol.pub("open.news", b"not allowed"))
            assert await publisher.failure() == 'E_UNAUTHORIZED AUTH failed for PUB on "open.news" ""'
    assert entry["authed"] is True
    assert entry["auth_identity"] == "tester"
    assert entry["auth_identity_url"] == "https://example.invalid/tester"
    assert auth.queries[0] == {"common_name": "", "remote_ip": "127.0.0.1", "secret": SECRET, "tls": "false"}


async def test_commands_after_auth_wait_for_its_answer(kind: str, certificates: Certificates) -> None:
    # Sent at once, PUB is checked against the answer AUTH is still waiting for.
    topic = new_topic()
    with (
        AuthServer({SECRET: grant("tester", allow(f"^{topic}$", channels=("",)))}) as auth,
        secure_broker(kind, auth_http_address=auth.address) as broker,
    ):
        connection = await RawConnection.open(broker.tcp_address)
        connection.send(encode_auth(SECRET.encode()) + encode_pub(topic, b"first") + encode_pub("other", b"second"))
        answer = await connection.frame()
        assert isinstance(answer, ResponseFrame)
        assert json.loads(answer.data) == {"identity": "tester", "identity_url": "", "permission_count": 1}
        assert await connection.frame() == ResponseFrame(OK)
        assert await connection.error_then_closed() == b'E_UNAUTHORIZED AUTH failed for PUB on "other" ""'


async def test_auth_failures(kind: str, certificates: Certificates) -> None:
    answers = {
        SECRET: grant("tester", allow(".*")),
        "nothing": grant("nobody"),
        # Answers nsqd refuses, and so says AUTH failed: an unknown permission, an expression
        # that does not compile, no ttl.
        "admin": grant("root", allow(".*", permissions=("admin",))),
        "broken": grant("broken", allow("(")),
        "forever": grant("tester", allow(".*"), ttl=0),
    }
    with (
        AuthServer(answers) as auth,
        secure_broker(kind, auth_http_address=auth.address) as broker,
    ):
        for secret in ("wrong", "admin", "broken", "forever"):
            refused = Pynsq(broker.tcp_address, auth_secret=secret)
            refused.conn.connect()
            assert await refused.failure() == "E_AUTH_FAILED AUTH failed"
        empty = Pynsq(broker.tcp_address, auth_secret="nothing")
        empty.conn.connect()
        assert await empty.failure() == "E_UNAUTHORIZED AUTH no authorizations found"
        async with pynsq(broker.tcp_address) as anonymous:  # no secret: pynsq sends no AUTH
            anonymous.conn.send(nsq.protocol.pub(new_topic(), b"who am I"))
            assert await anonymous.failure() == "E_AUTH_FIRST AUTH required before PUB"
        async with pynsq(broker.tcp_address, auth_secret=SECRET) as twice:
            twice.conn.send(nsq.protocol.auth(SECRET.encode()))
            assert await twice.failure() == "E_INVALID AUTH already set"
    assert len(auth.queries) == 6


async def test_auth_is_asked_again_once_its_ttl_passed(kind: str, certificates: Certificates) -> None:
    topic = new_topic()
    answers = {SECRET: grant("tester", allow(".*"), ttl=1)}
    with AuthServer(answers) as auth, secure_broker(kind, auth_http_address=auth.address) as broker:
        async with pynsq(broker.tcp_address, auth_secret=SECRET) as client:
            await client.pub(topic, b"first")
            assert len(auth.queries) == 1
            await asyncio.sleep(1.2)
            answers[SECRET] = grant("tester", allow("^elsewhere$"), ttl=1)  # the new answer takes the topic away
            client.conn.send(nsq.protocol.pub(topic, b"second"))
            assert await client.failure() == f'E_UNAUTHORIZED AUTH failed for PUB on "{topic}" ""'
    assert len(auth.queries) == 2


async def test_auth_over_tls_tells_the_client_certificate(kind: str, certificates: Certificates) -> None:
    settings = {
        "tls_client_auth_policy": "require-verify",
        "tls_root_ca_file": certificates.ca,
        "tls_required": "tcp-https",
        **server_tls(certificates),
    }
    with (
        AuthServer({SECRET: grant("tester", allow(".*"))}) as auth,
        secure_broker(kind, auth_http_address=auth.address, **settings) as broker,
    ):
        options = tls_options(certificates, "client")
        async with pynsq(broker.tcp_address, tls_v1=True, tls_options=options, auth_secret=SECRET) as client:
            await client.pub(new_topic(), b"from a known client")
            entry = await client_entry(broker.http_address, client.hostname)
    assert (entry["tls"], entry["authed"]) == (True, True)
    assert auth.queries == [
        {"common_name": CLIENT_COMMON_NAME, "remote_ip": "127.0.0.1", "secret": SECRET, "tls": "true"}
    ]


# --- settings --------------------------------------------------------------------


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="cannot require TLS client connections without TLS key and cert"):
        BrokerOptions(tls_required=True)
    with pytest.raises(ValueError, match="cannot require TLS"):
        BrokerOptions(tls_client_auth_policy="require-verify")
    with pytest.raises(ValueError, match="tls_client_auth_policy"):
        BrokerOptions(tls_client_auth_policy="maybe")
    with pytest.raises(ValueError, match="unknown tls_min_version"):
        BrokerOptions(tls_min_version="ssl3.0")
    with pytest.raises(ValueError, match="max_deflate_level"):
        BrokerOptions(max_deflate_level=10)
    with pytest.raises(ValueError, match="failed to build TLS config"):
        Broker(tls_cert="/nonexistent/cert.pem", tls_key="/nonexistent/key.pem")
    assert BrokerOptions(tls_required="TRUE", tls_cert="c", tls_key="k").tls_required is True
    assert BrokerOptions(tls_min_version="TLS1.2").tls_min_version == "tls1.2"
    assert BrokerOptions(auth_http_address="a:1, b:2").auth_http_addresses == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"tls_required": False, "snappy": True, "deflate": True}),
        (
            ["--tls-required", "--snappy=false", "--deflate", "f"],
            {"tls_required": True, "snappy": False, "deflate": False},
        ),
        (["--tls-required=tcp-https", "--snappy=1"], {"tls_required": "tcp-https", "snappy": True}),
        (
            ["--tls-required=false", "--auth-http-address=127.0.0.1:4181"],
            {"tls_required": False, "auth_http_address": "127.0.0.1:4181"},
        ),
    ],
)
def test_broker_flags_are_nsqds(flags: list[str], expected: dict[str, Any]) -> None:
    # The flags as `almanet broker` reads them: a boolean flag alone is true, or takes Go's spellings.
    parser = argparse.ArgumentParser()
    _add_option_flags(parser)
    parsed = vars(parser.parse_args(flags))
    assert {key: parsed[key] for key in expected} == expected
    BrokerOptions(**{**parsed, "tls_cert": "c", "tls_key": "k"})  # they make valid settings
