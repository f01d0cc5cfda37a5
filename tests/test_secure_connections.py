"""TLS, snappy, deflate and AUTH from the client's side (issue 13), on nsqd and on the embedded broker.

Each test starts a broker of its own with nsqd's flags (the embedded broker
takes them as ``BrokerOptions`` fields) and certificates made for it
(``almanet.bench.certificates``). That a feature was negotiated is checked
on both ends: the client's ``Connection.negotiated``, and the broker's
``/stats``, whose client entries say ``tls``, ``snappy`` and ``deflate``;
messages flowing through a compressed stream show it is used both ways
(a broker that reads compressed bytes as frames closes the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from authserver import AuthServer, allow, grant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import almanet
from almanet.bench.certificates import Certificates, make_certificates
from almanet.broker import BrokerOptions
from almanet.broker.nsqd import find_nsqd, nsqd_process
from almanet.nsq import Connection, ConnectionOptions, Consumer, Producer
from almanet.pytest_plugin import broker_in_thread
from almanet.wire import compression
from almanet.wire.compression import DeflateStream, SnappyStream
from almanet.wire.errors import CompressionError, ProtocolError
from helpers import eventually, mutate

KINDS = ["nsqd", "embedded"]
SECRET = "open sesame"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@contextlib.contextmanager
def broker(kind: str, **flags: Any) -> Iterator[tuple[str, str]]:
    """A broker of ``kind`` with nsqd's ``flags`` (as ``BrokerOptions`` names them): its TCP and HTTP addresses."""
    if kind == "embedded":
        missing = sorted(set(flags) - {field for field in BrokerOptions.__dataclass_fields__})
        if missing:
            pytest.skip(f"the embedded broker has no {', '.join(missing)} yet")
        with broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", **flags) as running:
            yield running.tcp_address, running.http_address
        return
    executable = find_nsqd()
    if executable is None:
        pytest.skip("needs an nsqd binary to start (ALMANET_NSQD or PATH)")
    written = {name: str(value).lower() if isinstance(value, bool) else value for name, value in flags.items()}
    with nsqd_process(executable, *(f"-{name.replace('_', '-')}={value}" for name, value in written.items())) as both:
        yield both


def tls_flags(certificates: Certificates, **more: Any) -> dict[str, Any]:
    return {
        "tls_cert": certificates.server_cert,
        "tls_key": certificates.server_key,
        "tls_root_ca_file": certificates.ca,
        **more,
    }


async def clients_of(http_address: str) -> list[dict[str, Any]]:
    """Every client entry of the broker's /stats: subscribers, and publishers that subscribe nothing."""

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{http_address}/stats?format=json", timeout=TIMEOUT) as response:
            report: dict[str, Any] = json.load(response)
            return report

    report = await asyncio.to_thread(get)
    subscribers = [c for t in report["topics"] or [] for ch in t["channels"] or [] for c in ch["clients"] or []]
    by_address = {client["remote_address"]: client for client in [*subscribers, *(report.get("producers") or [])]}
    return list(by_address.values())


async def call_and_consume(address: str, http_address: str = "", **options: Any) -> list[dict[str, Any]]:
    """A service and a session with ``options``: calls, and a produced message consumed and committed.

    The client entries of the broker's /stats (at ``http_address``) meanwhile, when given.
    """
    name = f"secure.{uuid.uuid4().hex[:12]}"
    service = almanet.new_service(address, prefix=name, **options)

    @service.procedure
    async def echo(payload: str, **kwargs: Any) -> str:
        return payload

    big = os.urandom(100_000).hex()  # more than one snappy chunk, and little to compress
    async with service, almanet.new_session(address, **options) as session:
        for payload in ("hello " * 500, big):
            assert (await session.call(echo, payload, timeout=TIMEOUT)).payload == payload
        await eventually(lambda: echo.uri in session._discovery.batches)  # calls in batches over it too
        replies = await asyncio.gather(*(session.call(echo, f"n{number}", timeout=TIMEOUT) for number in range(200)))
        assert [reply.payload for reply in replies] == [f"n{number}" for number in range(200)]
        await session.produce(f"{name}.events", {"n": 1, "text": "x" * 2000})
        async with session.consume(f"{name}.events", "ch") as messages:
            async for message in messages:
                assert message.payload == {"n": 1, "text": "x" * 2000}
                message.commit()
                break
            return await clients_of(http_address) if http_address else []


COMBINATIONS = {
    "tls": {"tls": True},
    "tls+snappy": {"tls": True, "snappy": True},
    "tls+deflate": {"tls": True, "deflate": True},
    "snappy": {"snappy": True},
    "deflate": {"deflate": True},
    "plaintext": {},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combination", COMBINATIONS)
async def test_rpc_and_consuming_over_each_combination(kind: str, combination: str, certificates: Certificates) -> None:
    wanted = COMBINATIONS[combination]
    options: dict[str, Any] = {name: value for name, value in wanted.items() if name != "tls"}
    if wanted.get("tls"):
        options["tls_ca_file"] = certificates.ca
    with broker(kind, **tls_flags(certificates)) as (address, http_address):
        async with Producer(address, options=ConnectionOptions(**options)) as producer:
            connection = await producer.connect()
            negotiated = connection.negotiated
            assert negotiated["tls_v1"] is bool(wanted.get("tls"))
            assert negotiated["snappy"] is bool(wanted.get("snappy"))
            assert negotiated["deflate"] is bool(wanted.get("deflate"))
            await producer.publish("secure.producer", b"x" * 1000)
            clients = await call_and_consume(address, http_address, **options)
        # The producer; the service's procedure and discovery; the session's replies and consume...
        assert len(clients) >= 5, clients
        for client in clients:
            assert client["tls"] is bool(wanted.get("tls")), client
            assert client["snappy"] is bool(wanted.get("snappy")), client
            assert client["deflate"] is bool(wanted.get("deflate")), client
            if wanted.get("tls"):
                assert client["tls_version"] in ("TLS1.2", "TLS1.3"), client


@pytest.mark.parametrize("kind", KINDS)
async def test_the_deflate_level_is_negotiated_down_to_the_brokers_maximum(
    kind: str, certificates: Certificates
) -> None:
    with broker(kind, max_deflate_level=3) as (address, _):
        options = ConnectionOptions(deflate=True, deflate_level=9)
        connection = await Connection.open(address, options)
        try:
            assert (connection.negotiated["deflate"], connection.negotiated["deflate_level"]) == (True, 3)
        finally:
            await connection.close()
        await call_and_consume(address, deflate=True, deflate_level=9)


@pytest.mark.parametrize("kind", KINDS)
async def test_compression_the_broker_does_not_offer_is_left_out(kind: str) -> None:
    with broker(kind, snappy=False, deflate=False) as (address, http_address):
        for options in ({"snappy": True}, {"deflate": True}):
            clients = await call_and_consume(address, http_address, **options)
            assert clients
            assert not any(client["snappy"] or client["deflate"] for client in clients)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_certificate_the_broker_requires(kind: str, certificates: Certificates) -> None:
    # TLS required of TCP clients (as the policy implies), not of HTTP ones: /stats stays plain HTTP.
    flags = tls_flags(certificates, tls_client_auth_policy="require-verify", tls_required="tcp-https")
    with broker(kind, **flags) as (address, http_address):
        mine = {"tls_cert_file": certificates.client_cert, "tls_key_file": certificates.client_key}
        clients = await call_and_consume(address, http_address, tls_ca_file=certificates.ca, **mine)
        assert clients
        assert all(client["tls"] for client in clients)
        with pytest.raises(almanet.ConnectionFailed, match=r"TLS.*client certificate"):
            async with almanet.new_session(address, tls_ca_file=certificates.ca):
                pass
        # A certificate the broker's CA did not sign: the broker's own server certificate is not a client's.
        other = {"tls_cert_file": certificates.server_cert, "tls_key_file": certificates.server_key}
        with pytest.raises(almanet.ConnectionFailed, match="TLS"):
            async with almanet.new_session(address, tls_ca_file=certificates.other_ca, **other):
                pass


@pytest.mark.parametrize("kind", KINDS)
async def test_a_broker_certificate_the_client_does_not_trust_fails_clearly(
    kind: str, certificates: Certificates
) -> None:
    with broker(kind, **tls_flags(certificates)) as (address, _):
        with pytest.raises(almanet.ConnectionFailed, match=r"TLS handshake .* failed.*CERTIFICATE_VERIFY_FAILED"):
            async with almanet.new_session(address, tls_ca_file=certificates.other_ca):
                pass
        with pytest.raises(almanet.ConnectionFailed, match=r"TLS handshake .* failed.*'nsqd\.example'"):
            async with almanet.new_session(address, tls_ca_file=certificates.ca, tls_server_hostname="nsqd.example"):
                pass
        # The name the certificate has, for an address that is not it.
        async with almanet.new_session(address, tls_ca_file=certificates.ca, tls_server_hostname="localhost") as s:
            await s.produce("secure.named", 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_tls_required_without_tls_configured_fails_at_join(kind: str, certificates: Certificates) -> None:
    with broker(kind, **tls_flags(certificates, tls_required=True)) as (address, _):
        for options in ({}, {"snappy": True}, {"deflate": True}):
            with pytest.raises(almanet.ConnectionFailed, match=r"requires TLS .*pass tls_ca_file"):
                await almanet.new_session(address, **options).join()
        service = almanet.new_service(address, prefix="secure")
        service.procedure(name="echo")(lambda payload: payload)
        with pytest.raises(almanet.ConnectionFailed, match="requires TLS"):
            await service.start()
        consumer = Consumer("secure.events", "ch", lambda message: message.fin(), nsqd_tcp_addresses=[address])
        with pytest.raises(almanet.ConnectionFailed, match="requires TLS"):
            await consumer.start()
        await call_and_consume(address, tls_ca_file=certificates.ca, snappy=True)


@pytest.mark.parametrize("kind", KINDS)
async def test_tls_configured_and_not_offered_is_refused(kind: str, certificates: Certificates) -> None:
    with broker(kind) as (address, _), pytest.raises(almanet.ConnectionFailed, match="does not offer TLS"):
        await almanet.new_session(address, tls_ca_file=certificates.ca).join()


# --- AUTH -----------------------------------------------------------------------------------


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    """An auth server granting SECRET everything, as "tester"."""
    everything = grant("tester", allow(".*"), identity_url="https://example.com/tester")
    with AuthServer({SECRET: everything}) as server:
        yield server


@pytest.mark.parametrize("kind", KINDS)
async def test_auth_after_tls_logs_the_identity_and_authenticates_again_on_reconnection(
    kind: str,
    certificates: Certificates,
    auth_server: AuthServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests = auth_server.queries
    flags = tls_flags(certificates, tls_required=True, auth_http_address=auth_server.address)
    with broker(kind, **flags) as (address, _):
        caplog.set_level(logging.INFO, "almanet.nsq")
        await call_and_consume(address, tls_ca_file=certificates.ca, snappy=True, auth_secret=SECRET)
        identities = [r.getMessage() for r in caplog.records if r.getMessage().startswith("authenticated to")]
        assert identities
        assert all("as 'tester' (1 permissions; https://example.com/tester)" in line for line in identities)
        assert all(query["secret"] == SECRET and query["tls"] == "true" for query in requests)

        inbox: asyncio.Queue[bytes] = asyncio.Queue()

        def on_message(message: Any) -> None:
            inbox.put_nowait(message.body)
            message.fin()

        options = ConnectionOptions(tls_ca_file=certificates.ca, auth_secret=SECRET, max_reconnect_interval=0.1)
        topic = f"secure.{uuid.uuid4().hex[:12]}"
        async with Consumer(topic, "ch", on_message, nsqd_tcp_addresses=[address], options=options) as consumer:
            first = next(iter(consumer.connections.values()))
            asked = len(requests)
            first.abort()  # as a network failure: the consumer reconnects
            await eventually(lambda: consumer.connections.get(address) not in (None, first))
            assert len(requests) > asked  # the new connection authenticated again
            async with Producer(address, options=options) as producer:
                await producer.publish(topic, b"after reconnecting")
            assert await asyncio.wait_for(inbox.get(), TIMEOUT) == b"after reconnecting"
        with pytest.raises(almanet.ConnectionFailed, match="E_AUTH_FAILED"):
            await almanet.new_session(address, tls_ca_file=certificates.ca, auth_secret="wrong").join()


# --- the command line -----------------------------------------------------------------------


SERVICE_MODULE = """
import almanet

service = almanet.new_service("127.0.0.1:1", prefix="secure.cli")


@service.procedure
async def greet(payload: str) -> str:
    return f"hello {payload}"
"""


@pytest.mark.parametrize("kind", KINDS)
async def test_almanet_serve_and_call_take_the_connection_flags(
    kind: str, certificates: Certificates, auth_server: AuthServer, tmp_path: Path
) -> None:
    (tmp_path / "secureservice.py").write_text(textwrap.dedent(SERVICE_MODULE))
    flags = tls_flags(certificates, tls_required="tcp-https", auth_http_address=auth_server.address)
    with broker(kind, **flags) as (address, http_address):
        env = {**os.environ, "ALMANET_AUTH_SECRET": SECRET}
        connection = ["--address", address, "--tls-ca-file", certificates.ca, "--snappy"]
        almanet_command = [sys.executable, "-m", "almanet"]
        serve = subprocess.Popen(
            [*almanet_command, "serve", "secureservice:service", *connection],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert serve.stderr is not None
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(serve.stderr or ()), daemon=True).start()
        try:
            await eventually(lambda: any("serving secure.cli.greet" in line for line in log), 30)
            called = await asyncio.to_thread(
                subprocess.run,
                [*almanet_command, "call", "secure.cli.greet", '"you"', "--timeout", "20", *connection],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert called.returncode == 0, called.stderr
            assert json.loads(called.stdout) == "hello you"
            served = await clients_of(http_address)  # almanet serve's
            assert served
            assert all(client["tls"] and client["snappy"] for client in served)
            plain = await asyncio.to_thread(
                subprocess.run,
                [*almanet_command, "call", "secure.cli.greet", '"you"', "--address", address],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert plain.returncode == 1
            assert "requires TLS" in plain.stderr
        finally:
            serve.terminate()
            serve.wait(30)
        assert any("authenticated to" in line for line in log)


def test_the_command_line_refuses_bad_connection_flags(tmp_path: Path) -> None:
    called = subprocess.run(
        [sys.executable, "-m", "almanet", "call", "x.y", "1", "--tls-ca-file", str(tmp_path / "missing.pem")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 2
    assert "cannot load the TLS files (tls_ca_file=" in called.stderr


# --- options --------------------------------------------------------------------------------


def test_what_identify_asks_for() -> None:
    plain = ConnectionOptions().identify_body()
    assert not {"tls_v1", "snappy", "deflate", "deflate_level"} & set(plain)
    asked = ConnectionOptions(tls=True, snappy=True).identify_body()
    assert (asked["tls_v1"], asked["snappy"]) == (True, True)
    deflate = ConnectionOptions(deflate=True, deflate_level=2).identify_body()
    assert (deflate["deflate"], deflate["deflate_level"]) == (True, 2)
    # nsqd flushes deflate with its output buffer: never without one.
    assert (deflate["output_buffer_size"], deflate["output_buffer_timeout"]) == (0, 25)
    timed = ConnectionOptions(deflate=True, output_buffer_timeout=0.005).identify_body()
    assert (timed["output_buffer_size"], timed["output_buffer_timeout"]) == (0, 5)


def test_tls_is_on_when_any_tls_option_says_so(certificates: Certificates) -> None:
    assert not ConnectionOptions().uses_tls
    assert ConnectionOptions().ssl_context is None
    for options in (
        {"tls": True},
        {"tls_ca_file": certificates.ca},
        {"tls_cert_file": certificates.client_cert, "tls_key_file": certificates.client_key},
    ):
        assert ConnectionOptions(**options).uses_tls
        assert ConnectionOptions(**options).ssl_context is not None
    import ssl

    context = ssl.create_default_context()
    assert ConnectionOptions(tls_context=context).ssl_context is context


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"snappy": True, "deflate": True}, ValueError, "snappy or deflate, not both"),
        ({"deflate_level": 0}, ValueError, "deflate_level must be 1 to 9"),
        ({"deflate_level": 10}, ValueError, "deflate_level must be 1 to 9"),
        ({"tls_key_file": "key.pem"}, ValueError, "give the certificate too"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, ValueError, r"cannot load the TLS files \(tls_ca_file='/nonex"),
    ],
)
def test_options_refused_at_once(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ConnectionOptions(**options)
    with pytest.raises(error, match=message):
        almanet.new_session("127.0.0.1:4150", **options)


def test_a_context_and_files_together_are_refused(certificates: Certificates) -> None:
    import ssl

    with pytest.raises(ValueError, match="not both"):
        ConnectionOptions(tls_context=ssl.create_default_context(), tls_ca_file=certificates.ca)


def test_snappy_without_cramjam_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "cramjam", None)
    with pytest.raises(ImportError, match=r"pip install 'almanet\[snappy\]'"):
        ConnectionOptions(snappy=True)
    with pytest.raises(ImportError, match=r"almanet\[snappy\]"):
        SnappyStream()


# --- the compressed streams -----------------------------------------------------------------


STREAMS = {"snappy": SnappyStream, "deflate": lambda: DeflateStream(6)}


@pytest.mark.parametrize("name", STREAMS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(st.binary(max_size=3000) | st.binary(max_size=8).map(lambda b: b * 20000), max_size=8),
    cuts=st.lists(st.integers(1, 70000), max_size=20),
)
def test_what_is_written_is_read_however_the_reads_cut_it(name: str, writes: list[bytes], cuts: list[int]) -> None:
    writer, reader = STREAMS[name](), STREAMS[name]()
    sent = b"".join(writer.compress(data) for data in writes)
    received = []
    position = 0
    for cut in cuts:
        received.append(reader.decompress(sent[position : position + cut]))
        position += cut
    received.append(reader.decompress(sent[position:]))
    assert b"".join(received) == b"".join(writes)


@pytest.mark.parametrize("name", STREAMS)
def test_each_write_is_decoded_at_once(name: str) -> None:
    """One write of the sender is all the receiver needs to decode it: nothing waits for more."""
    writer, reader = STREAMS[name](), STREAMS[name]()
    for data in (b"IDENTIFY\n", b"x" * 100_000, b"", b"PUB t\n" + bytes(range(256))):
        assert reader.decompress(writer.compress(data)) == data


@pytest.mark.parametrize("name", STREAMS)
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_corrupt_streams_raise_a_protocol_error(name: str, data: st.DataObject) -> None:
    writer, reader = STREAMS[name](), STREAMS[name]()
    valid = b"".join(writer.compress(chunk) for chunk in data.draw(st.lists(st.binary(max_size=500), max_size=4)))
    garbage = mutate(data.draw, valid) if data.draw(st.booleans()) else data.draw(st.binary(max_size=2000))
    try:
        for part in (garbage[: len(garbage) // 2], garbage[len(garbage) // 2 :]):
            reader.decompress(part)
    except ProtocolError as error:
        assert isinstance(error, CompressionError)


def test_snappy_refuses_what_golang_snappy_refuses() -> None:
    with pytest.raises(CompressionError, match="stream identifier"):
        SnappyStream().decompress(b"\x00\x05\x00\x00abcde")
    started = SnappyStream()
    started.decompress(b"\xff\x06\x00\x00sNaPpY")
    with pytest.raises(CompressionError, match="unskippable"):
        started.decompress(b"\x02\x01\x00\x00x")
    with pytest.raises(CompressionError, match="exceeds"):
        SnappyStream().decompress(b"\xff\x06\x00\x00sNaPpY\x00\xff\xff\xff")
    with pytest.raises(CompressionError, match="corrupt snappy"):  # a wrong checksum
        SnappyStream().decompress(b"\xff\x06\x00\x00sNaPpY\x01\x05\x00\x00\x00\x00\x00\x00x")
    skipping = SnappyStream()  # padding and reserved skippable chunks are skipped
    assert skipping.decompress(b"\xff\x06\x00\x00sNaPpY\xfe\x02\x00\x00\x00\x00\x80\x00\x00\x00") == b""


def test_deflate_refuses_data_after_its_end() -> None:
    import zlib

    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    ended = compressor.compress(b"done") + compressor.flush()
    with pytest.raises(CompressionError, match="after the end"):
        DeflateStream().decompress(ended + b"more")
    with pytest.raises(CompressionError, match="corrupt deflate"):
        DeflateStream().decompress(b"\xff\xff\xff\xff")


def test_deflate_refuses_a_read_that_inflates_past_its_limit() -> None:
    """Deflate expands up to ~1000-fold: a peer must not make one read weigh more than the limit."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"\0" * (2 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 4096
    assert len(DeflateStream(max_inflated=4 << 20).decompress(bomb)) == 2 << 20
    with pytest.raises(CompressionError, match="inflates to more than 1048576 bytes"):
        DeflateStream(max_inflated=1 << 20).decompress(bomb)
