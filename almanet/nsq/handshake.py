"""Connecting to nsqd: the magic, IDENTIFY, the upgrades nsqd agrees to (TLS, then snappy or deflate), AUTH.

``connect()`` runs them on a protocol of its own, ``Handshake``. After its
answer to IDENTIFY, and to each upgrade, nsqd may switch the stream (to TLS,
to compressed): so answers are taken one frame at a time from what was read,
and what follows one is read as the next stream. Once the handshake is over,
its ``start`` (``Connection.open``'s) takes the upgraded stream over with
``hand_over``, as asyncpg's ``connect_utils`` hands its protocol a
connection upgraded to TLS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any, TypeVar, cast

from almanet._speedups.frames import ErrorFrame, FrameReader, MessageFrame, encode_auth, encode_identify
from almanet.loops import within
from almanet.nsq.options import ConnectionOptions
from almanet.wire.addresses import split_address
from almanet.wire.compression import MAX_INFLATED_READ, DeflateStream, SnappyStream
from almanet.wire.errors import CommandError, ConnectionFailed, ProtocolError, Unauthorized
from almanet.wire.protocol import HEARTBEAT, MAGIC_V2, NOP, OK

logger = logging.getLogger("almanet.nsq")
T = TypeVar("T")

# nsqd's answer to any command but IDENTIFY from a client without TLS when it runs with --tls-required.
TLS_REQUIRED = "(TLS required)"


def tls_required_error(address: str) -> ConnectionFailed:
    return ConnectionFailed(
        f"nsqd at {address} requires TLS (its --tls-required): pass tls_ca_file (or tls=True, tls_context) "
        "to new_session or new_service, or --tls-ca-file to almanet call and serve"
    )


def command_error(data: bytes, address: str) -> CommandError:
    """The error of an error frame from nsqd at ``address``: its ``data`` is ``E_CODE description``."""
    code, _, description = data.decode("utf-8", "replace").partition(" ")
    if code == "E_UNAUTHORIZED":
        return Unauthorized(code, description, address)
    return CommandError(code, description)


def _answered_http(address: str) -> ConnectionFailed:
    return ConnectionFailed(
        f"{address} answered with HTTP: that is nsqd's HTTP port (4151 by default); give its TCP port (4150 by default)"
    )


async def connect(address: str, options: ConnectionOptions, start: Callable[[Handshake], None]) -> None:
    """Connect to nsqd at ``host:port`` and handshake; ``start(handshake)`` takes over right after the last answer.

    Raises ``ConnectionError`` or ``CommandError``.
    """
    host, port = split_address(address)
    loop = asyncio.get_running_loop()
    handshake = Handshake(address, options)
    try:
        await within(loop.create_connection(lambda: handshake, host, port), options.connect_timeout)
    except BaseException as error:
        handshake.abort()  # cancelled as the connection was made: closed, not leaked
        if isinstance(error, (OSError, asyncio.TimeoutError)):
            raise ConnectionFailed(f"cannot connect to nsqd at {address}: {error or 'timed out'}") from error
        raise
    try:
        await within(handshake.run(start), options.connect_timeout)
    except BaseException as error:
        handshake.abort()  # the stream, whichever protocol has it by now
        if handshake.answered_http:
            raise _answered_http(address) from None
        if isinstance(error, asyncio.TimeoutError):
            raise ConnectionFailed(f"nsqd at {address} did not answer IDENTIFY in time") from error
        raise


class Handshake(asyncio.Protocol):
    """The protocol of a connection to nsqd until its handshake is over (see the module docstring)."""

    def __init__(self, address: str, options: ConnectionOptions) -> None:
        self.address = address
        self.options = options
        self.negotiated: dict[str, Any] = {}  # nsqd's answer to IDENTIFY, and AUTH's under "auth"
        self.compression: SnappyStream | DeflateStream | None = None  # once started: every read and write
        self.answered_http = False  # the peer is an HTTP server (nsqd's HTTP port?)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._open = False
        self._error: BaseException | None = None
        self._read = bytearray()  # read, decompressed, and not taken as an answer yet
        self._more: asyncio.Future[None] | None = None  # what waits for more of it

    async def run(self, start: Callable[[Handshake], None]) -> None:
        """IDENTIFY; the upgrades nsqd agreed to (TLS, then snappy or deflate); AUTH if nsqd requires it; ``start``."""
        options = self.options
        upgrading = options.uses_tls or options.snappy or options.deflate
        identify = encode_identify(options.identify_body())
        probing = not upgrading
        # The probe goes in the same write as IDENTIFY: no round trip of its own. Nothing else may:
        # after its answer to IDENTIFY nsqd may switch the stream.
        self._write(MAGIC_V2, identify, *(self._probe() if probing else ()))
        answer = await self._answer("IDENTIFY")
        self.negotiated = self._json_answer("IDENTIFY", answer) if answer != OK else {}
        if upgrading:
            await self._upgrade()
            probing = not self.negotiated.get("tls_v1")
            if probing:
                self._write(*self._probe())
        if probing:
            try:
                answer = await self._answer("IDENTIFY")
            except CommandError as error:
                if error.code == "E_INVALID" and error.description.endswith(TLS_REQUIRED):
                    raise tls_required_error(self.address) from error
                raise
            if answer != OK:
                raise self._protocol_broken("IDENTIFY", answer)
        if self.negotiated.get("auth_required"):
            await self._authenticate()
        start(self)

    def hand_over(self, protocol: asyncio.Protocol) -> bytes:
        """Make ``protocol`` the connection's; returns what was read after the last answer, decompressed."""
        transport = self._transport
        if not self._open or transport is None:
            raise ConnectionFailed(f"connection to nsqd at {self.address} lost as its handshake ended")
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        rest = bytes(self._read)
        self._read.clear()
        return rest

    def _probe(self) -> tuple[bytes, bytes]:
        """What asks, without TLS, whether nsqd requires it (``--tls-required``); ``run`` reads the answer.

        NOP, which such an nsqd refuses, closing the connection; then IDENTIFY
        without feature negotiation, which nsqd answers OK otherwise. Before
        SUB or PUB nsqd answers nothing else that has no side effect, and its
        answer to IDENTIFY does not tell: so a session without TLS fails at
        join, not at its first publish.
        """
        # Without heartbeat, output buffer and msg timeout: nsqd keeps its settings, and its writer
        # (a new output buffer would write past TLS and compression, to the socket).
        options = self.options
        body = {"client_id": options.client_id, "hostname": options.hostname, "user_agent": options.user_agent}
        return NOP, encode_identify({**body, "sample_rate": options.sample_rate})

    async def _upgrade(self) -> None:
        """TLS, then snappy or deflate, as nsqd agreed in its answer to IDENTIFY; each confirmed by an OK through it."""
        negotiated = self.negotiated
        options = self.options
        if negotiated.get("tls_v1") and options.uses_tls:
            await self._start_tls()
        elif options.uses_tls:
            raise ConnectionFailed(
                f"nsqd at {self.address} does not offer TLS (it runs without --tls-cert and --tls-key), "
                "and TLS is configured: not connecting in plaintext"
            )
        elif negotiated.get("tls_v1"):
            raise self._protocol_broken("IDENTIFY", b"tls_v1 true, which was not asked for")
        stream: SnappyStream | DeflateStream | None = None
        if negotiated.get("snappy") and options.snappy:
            stream = SnappyStream()
        elif negotiated.get("deflate") and options.deflate:
            level = int(negotiated.get("deflate_level") or options.deflate_level)
            stream = DeflateStream(level, max(MAX_INFLATED_READ, 2 * options.max_frame_size))
        elif options.snappy or options.deflate:
            wanted = "snappy" if options.snappy else "deflate"
            logger.info("nsqd at %s does not offer %s (its --%s=false): uncompressed", self.address, wanted, wanted)
        if stream is not None:
            await self._start_compression(stream)

    async def _start_tls(self) -> None:
        context = self.options.ssl_context
        assert context is not None and self._transport is not None
        host = self.options.tls_server_hostname or split_address(self.address)[0]
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self,
                context,
                server_hostname=host,
                ssl_handshake_timeout=self.options.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError and its certificate errors too
            hint = (
                f"is nsqd's certificate signed by a CA of tls_ca_file, and issued to {host!r} (tls_server_hostname)?"
                if isinstance(error, ssl.SSLCertVerificationError)
                else "does nsqd require a client certificate (tls_cert_file, tls_key_file)?"
            )
            raise ConnectionFailed(f"TLS handshake with nsqd at {self.address} failed: {error}; {hint}") from error
        if transport is None:
            raise ConnectionFailed(f"connection to nsqd at {self.address} lost during the TLS handshake")
        self._transport = transport
        try:
            answer = await self._answer("TLS")
        except ConnectionFailed as error:
            # With TLS 1.3, nsqd refuses a client certificate after the client's side of the handshake is done.
            reason = error.__cause__ or error
            raise ConnectionFailed(
                f"nsqd at {self.address} closed the connection after the TLS handshake: {reason}; does it require "
                "a client certificate it trusts (tls_cert_file, tls_key_file)?"
            ) from error
        if answer != OK:
            raise self._protocol_broken("TLS", answer)

    async def _start_compression(self, stream: SnappyStream | DeflateStream) -> None:
        """Read and write through ``stream`` from here on (what was read after the last answer is compressed)."""
        read = self._read
        name = "snappy" if isinstance(stream, SnappyStream) else "deflate"
        self.compression = stream
        compressed = bytes(read)
        read.clear()
        try:
            read += stream.decompress(compressed)
        except ProtocolError as error:
            raise ConnectionFailed(f"nsqd at {self.address}: {error}") from error
        answer = await self._answer(name)
        if answer != OK:
            raise self._protocol_broken(name, answer)

    async def _authenticate(self) -> None:
        options = self.options
        if options.auth_secret is None:
            raise ConnectionFailed(f"nsqd at {self.address} requires AUTH and no auth_secret is configured")
        secret = options.auth_secret
        self._write(encode_auth(secret.encode() if isinstance(secret, str) else secret))
        auth = self.negotiated["auth"] = self._json_answer("AUTH", await self._answer("AUTH"))
        logger.info(
            "authenticated to nsqd at %s as %r (%s permissions%s)",
            self.address,
            auth.get("identity", ""),
            auth.get("permission_count", "?"),
            f"; {auth['identity_url']}" if auth.get("identity_url") else "",
        )

    async def _answer(self, command: str) -> bytes:
        """nsqd's next answer, taken from what was read: the stream may switch after it (see the module docstring).

        An error frame raises ``CommandError``; heartbeats are skipped.
        """
        read = self._read
        while True:
            if read[:4] == b"HTTP":
                self.answered_http = True
                raise _answered_http(self.address)
            # A reader for one frame: the bytes after it may be of the next stream.
            frames = FrameReader(self.options.max_frame_size)
            frames.feed(read)
            try:
                frame = next(frames, None)
            except ProtocolError as error:
                raise self._protocol_broken(command, bytes(read[:80])) from error
            if frame is not None:
                end = len(read) - frames.buffered
                if isinstance(frame, MessageFrame):  # nothing is subscribed yet
                    raise self._protocol_broken(command, bytes(read[8:end]))
                del read[:end]
                if isinstance(frame, ErrorFrame):
                    raise command_error(frame.data, self.address)
                if frame.data != HEARTBEAT:
                    return frame.data
                continue
            if not self._open:
                raise ConnectionFailed(f"connection to nsqd at {self.address} closed before it answered {command}")
            self._more = self._loop.create_future()
            await self._more  # woken by data_received, failed by connection_lost

    def _write(self, *commands: bytes) -> None:
        """``commands`` in one write, through the compression started."""
        transport = self._transport
        if self._open and transport is not None and not transport.is_closing():
            data = b"".join(commands)
            transport.write(data if self.compression is None else self.compression.compress(data))

    def _protocol_broken(self, command: str, answer: bytes) -> ConnectionFailed:
        error = ProtocolError(f"nsqd at {self.address} answered {command} with {answer[:80]!r}")
        failed = ConnectionFailed(str(error))
        failed.__cause__ = error
        return failed

    def _json_answer(self, command: str, answer: bytes) -> dict[str, Any]:
        """nsqd's answer to ``command``, a JSON object: anything else breaks the protocol."""
        try:
            decoded = json.loads(answer)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            error = ProtocolError(f"nsqd at {self.address} answered {command} with {answer[:80]!r}, not a JSON object")
            raise ConnectionFailed(str(error)) from error
        return decoded

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its API.
        self._transport = cast(asyncio.Transport, transport)
        self._open = True

    def data_received(self, data: bytes) -> None:
        if self.compression is not None:
            try:
                data = self.compression.decompress(data)
            except ProtocolError as error:
                logger.error("closing the connection to %s: %s", self.address, error)
                self.abort(error)
                return
        self._read += data
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        error = self._error or exc
        lost = ConnectionFailed(f"connection to nsqd at {self.address} lost" + (f": {error}" if error else ""))
        lost.__cause__ = error
        if self._more is not None and not self._more.done():
            self._more.set_exception(lost)

    def abort(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()
        self._open = False
