"""One client connection to an nsqd: handshake, pipelined commands and publishes, messages.

``Connection.open()`` connects, sends the magic, IDENTIFYs with feature
negotiation and AUTHs when nsqd requires it. ``request()`` sends a command
that nsqd answers (SUB, CLS) and returns a future of its answer;
``send_request()`` does the same for a waiter of the caller's. nsqd answers
in order, so answers are matched first in, first out, and any number may be
in flight. ``publish()`` publishes with a waiter of the caller's: publishes to
one topic made in one event-loop iteration go out as one MPUB (one PUB when
alone), so nsqd parses one command and sends one answer for all of them;
the commands of one iteration leave in one write. ``send()`` is for the
commands nsqd does not answer (RDY, FIN, REQ, TOUCH, NOP). Messages go to
the ``on_message`` callback straight from ``data_received``: no task per
message.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from almanet._speedups.frames import (
    ErrorFrame,
    FrameReader,
    MessageFrame,
    encode_auth,
    encode_dpub,
    encode_fin,
    encode_identify,
    encode_mpub,
    encode_pub,
    encode_rdy,
    encode_req,
    encode_touch,
)
from almanet._version import __version__
from almanet.wire.addresses import split_address
from almanet.wire.compression import MAX_INFLATED_READ, SNAPPY_MISSING, DeflateStream, SnappyStream, snappy_available
from almanet.wire.errors import CommandError, ConnectionFailed, MessageTooBig, ProtocolError, Unauthorized
from almanet.wire.protocol import (
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_MSG_SIZE,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_RESPONSE,
    HEARTBEAT,
    MAGIC_V2,
    NOP,
    OK,
)

logger = logging.getLogger("almanet.nsq")
T = TypeVar("T")

# Error frames nsqd sends without closing the connection; every other one is fatal.
NON_FATAL_ERRORS = frozenset({"E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"})
# nsqd's E_BAD_MESSAGE for a PUB, MPUB or DPUB message over its --max-msg-size.
_TOO_BIG = re.compile(r"message too big (\d+) > (\d+)")


def _answered_http(address: str) -> ConnectionFailed:
    return ConnectionFailed(
        f"{address} answered with HTTP: that is nsqd's HTTP port (4151 by default); give its TCP port (4150 by default)"
    )


# nsqd's answer to any command but IDENTIFY from a client without TLS when it runs with --tls-required.
_TLS_REQUIRED = "(TLS required)"


def _tls_required(address: str) -> ConnectionFailed:
    return ConnectionFailed(
        f"nsqd at {address} requires TLS (its --tls-required): pass tls_ca_file (or tls=True, tls_context) "
        "to new_session or new_service, or --tls-ca-file to almanet call and serve"
    )


# Messages bigger than this are published as a PUB of their own, never joined
# into an MPUB: should nsqd refuse one as too big, no other message goes with it.
# Sessions and services publish them apart from calls and replies (see
# ``Session._publish_apart``), as nsqd also closes the connection that sent it.
# nsqd does not tell its --max-msg-size (1 MiB by default): this assumes no
# nsqd is run with less than 4 KiB.
SEPARATE_PUBLISH_SIZE = 4 * 1024


# With deflate and output_buffer_size -1: the output buffer timeout asked for instead, nsqd's
# --min-output-buffer-timeout by default (see ConnectionOptions.identify_body).
DEFLATE_OUTPUT_BUFFER_TIMEOUT = 0.025


@dataclass(frozen=True)
class ConnectionOptions:
    """What a client tells nsqd in IDENTIFY, and its own limits and reconnection policy.

    Durations are seconds. ``msg_timeout`` None keeps nsqd's default;
    ``auth_secret`` is sent when nsqd says auth is required.

    ``output_buffer_size`` -1 (the default) has nsqd write each message to
    the socket at once. With a buffer (0: nsqd's default of 16 KiB, or 64
    bytes up to nsqd's ``--max-output-buffer-size``), nsqd holds messages to
    a consumer with RDY to spare until the buffer fills, it answers a
    command, or ``output_buffer_timeout`` (None: nsqd's default of 250 ms)
    ticks: fewer writes for nsqd, up to that long a wait for each message
    when traffic is light.

    ``max_msg_size`` and ``max_body_size`` are nsqd's limits (its flags of
    those names): publishes beyond them are refused before they are sent.
    ``max_reconnect_interval`` caps the backoff between reconnection attempts.

    TLS (nsqd's ``--tls-cert`` and ``--tls-key``) is used when ``tls`` is
    true or any of ``tls_context``, ``tls_ca_file``, ``tls_cert_file`` is
    given: the connection is upgraded after IDENTIFY, and refused if nsqd
    does not offer TLS. ``tls_ca_file`` (PEM) holds the CAs that nsqd's
    certificate must be signed by (default: the system's);
    ``tls_cert_file`` and ``tls_key_file`` (PEM; the key may be in the
    certificate's file) are the client certificate, for nsqd's
    ``--tls-client-auth-policy``. nsqd's certificate must name the host it
    is connected to, or ``tls_server_hostname``. ``tls_context``: an
    ``ssl.SSLContext`` of the caller's instead of those three. ``snappy``
    or ``deflate`` (at ``deflate_level``, 1 to 9, capped by nsqd's
    ``--max-deflate-level``) compress the connection both ways when nsqd
    agrees (its ``--snappy`` and ``--deflate``, on by default); snappy needs
    ``pip install 'almanet[snappy]'``. nsqd flushes its deflate stream with
    its output buffer only: with deflate, ``output_buffer_size`` -1 asks for
    nsqd's default buffer flushed every ``output_buffer_timeout`` (None:
    ``DEFLATE_OUTPUT_BUFFER_TIMEOUT``, 25 ms) instead, that long a wait for
    a message when traffic is light. ``auth_secret`` is sent after them.
    """

    client_id: str = socket.gethostname().split(".")[0]
    hostname: str = socket.gethostname()
    user_agent: str = f"almanet/{__version__}"
    heartbeat_interval: float = 30.0
    msg_timeout: float | None = None
    output_buffer_size: int = -1
    output_buffer_timeout: float | None = None
    sample_rate: int = 0
    auth_secret: str | bytes | None = None
    tls: bool = False
    tls_context: ssl.SSLContext | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None
    snappy: bool = False
    deflate: bool = False
    deflate_level: int = 6
    connect_timeout: float = 5.0
    max_reconnect_interval: float = 1.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    max_body_size: int = DEFAULT_MAX_BODY_SIZE

    def __post_init__(self) -> None:
        if self.output_buffer_size != -1 and self.output_buffer_size < 0:
            raise ValueError("output_buffer_size must be -1 (none), 0 (nsqd's default) or a size in bytes")
        for name in ("connect_timeout", "max_reconnect_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_frame_size", "max_msg_size", "max_body_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.snappy and self.deflate:
            raise ValueError("nsqd compresses a connection one way: snappy or deflate, not both")
        if not 1 <= self.deflate_level <= 9:
            raise ValueError(f"deflate_level must be 1 to 9, not {self.deflate_level}")
        if self.snappy and not snappy_available():
            raise ImportError(SNAPPY_MISSING)
        if self.tls_context is not None and (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
            raise ValueError("give tls_context, or tls_ca_file, tls_cert_file and tls_key_file: not both")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file is the key of tls_cert_file: give the certificate too")
        self.ssl_context  # noqa: B018 - the files are loaded now: a wrong one is an error here, not at connect time

    @property
    def uses_tls(self) -> bool:
        """Whether connections ask nsqd for TLS (and refuse to go on without it)."""
        return self.tls or self.tls_context is not None or bool(self.tls_ca_file or self.tls_cert_file)

    @functools.cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context connections upgrade with: ``tls_context``, or one made of the files; None without TLS."""
        if self.tls_context is not None or not self.uses_tls:
            return self.tls_context
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except OSError as error:  # ssl.SSLError too
            files = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file}
            files["tls_key_file"] = self.tls_key_file
            named = ", ".join(f"{name}={path!r}" for name, path in files.items() if path)
            raise ValueError(f"cannot load the TLS files ({named}): {error}") from error
        return context

    def identify_body(self) -> dict[str, Any]:
        buffer_size, buffer_timeout = self.output_buffer_size, self.output_buffer_timeout
        if self.deflate and buffer_size == -1:
            # nsqd flushes its deflate stream when it flushes its output buffer: without one, a
            # message would wait for the next heartbeat. So a buffer flushed as often as nsqd allows.
            buffer_size, buffer_timeout = 0, buffer_timeout or DEFLATE_OUTPUT_BUFFER_TIMEOUT
        body: dict[str, Any] = {
            "client_id": self.client_id,
            "hostname": self.hostname,
            "user_agent": self.user_agent,
            "feature_negotiation": True,
            "heartbeat_interval": round(self.heartbeat_interval * 1000),
            "output_buffer_size": buffer_size,
            "sample_rate": self.sample_rate,
        }
        if buffer_timeout is not None:
            body["output_buffer_timeout"] = round(buffer_timeout * 1000)
        if self.msg_timeout is not None:
            body["msg_timeout"] = round(self.msg_timeout * 1000)
        if self.uses_tls:
            body["tls_v1"] = True
        if self.snappy:
            body["snappy"] = True
        if self.deflate:
            body["deflate"] = True
            body["deflate_level"] = self.deflate_level
        return body


class Message:
    """A message from nsqd; answer it once with ``fin()`` or ``req()``, ``touch()`` meanwhile.

    Answers to a connection that is gone are dropped: nsqd redelivers the
    message after its msg_timeout.
    """

    __slots__ = ("_answered", "_connection", "attempts", "body", "id", "timestamp")

    def __init__(self, frame: MessageFrame, connection: Connection) -> None:
        self.id: bytes = frame.id
        self.body: bytes = frame.body
        self.timestamp: int = frame.timestamp
        self.attempts: int = frame.attempts
        self._connection = connection
        self._answered = False

    @property
    def answered(self) -> bool:
        return self._answered

    def fin(self) -> None:
        """Done with it (FIN)."""
        self._answer(encode_fin(self.id), requeued=False, backoff=False)

    def req(self, delay: float = 0.0, *, backoff: bool = False) -> None:
        """Give it back for redelivery after ``delay`` seconds (REQ); ``backoff`` counts it as a failure."""
        self._answer(encode_req(self.id, round(delay * 1000)), requeued=True, backoff=backoff)

    def publish(self, topic: str, body: bytes, answer: AnswerWaiter) -> None:
        """Publish through the connection this message came by (see ``Connection.publish``).

        What a handler publishes in answer to it (a reply) leaves in one write with its FIN.
        """
        self._connection.publish(topic, body, answer)

    @property
    def connection(self) -> Connection:
        """The connection it came by."""
        return self._connection

    @property
    def connection_open(self) -> bool:
        """Whether the connection it came by is open: what it publishes, and its FIN, can still go."""
        return self._connection.is_open

    def touch(self) -> None:
        """Restart its msg_timeout (TOUCH)."""
        if self._answered:
            raise RuntimeError("the message was already answered")
        self._connection.send(encode_touch(self.id))

    def _answer(self, command: bytes, *, requeued: bool, backoff: bool) -> None:
        if self._answered:
            raise RuntimeError("the message was already answered")
        self._answered = True
        self._connection.answered(command, requeued=requeued, backoff=backoff)

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, attempts={self.attempts}, body={self.body[:40]!r})"


class AnswerWaiter(Protocol):
    """What waits for nsqd's answer to a command: an ``asyncio.Future[bytes]`` or alike."""

    def done(self) -> bool: ...
    def set_result(self, answer: bytes, /) -> None: ...
    def set_exception(self, error: BaseException, /) -> None: ...


# MPUB's body: a message count, then each message's size and bytes.
_MPUB_COUNT_SIZE = 4
_MPUB_SIZE_FIELD = 4

# Frames handled per loop iteration; the rest wait for the next one. The
# commands and publishes they lead to then leave in a write per iteration
# while the rest is handled, so that nsqd and the peers behind it start on
# them at once rather than on everything a big read brought, at the end.
# (Measured: RPC with 256 calls in flight, about 1.5 times the throughput.)
_FRAMES_PER_ITERATION = 64


class Publish:
    """One PUB, MPUB or DPUB to send, and the waiters of nsqd's answer to it (an ``AnswerWaiter`` itself)."""

    __slots__ = ("bodies", "body_size", "command", "topic", "waiters")

    def __init__(self, topic: str, command: bytes, first_body: bytes | None = None) -> None:
        self.topic = topic
        self.command = command  # PUB of the first body, or a command that takes no more (DPUB, explicit MPUB)
        self.bodies = [] if first_body is None else [first_body]  # the bodies coalesced
        self.body_size = _MPUB_COUNT_SIZE + sum(_MPUB_SIZE_FIELD + len(body) for body in self.bodies)
        self.waiters: list[AnswerWaiter] = []

    def encode(self) -> bytes:
        return encode_mpub(self.topic, self.bodies) if len(self.bodies) > 1 else self.command

    def done(self) -> bool:
        return False  # answered once, by the connection

    def set_result(self, answer: bytes) -> None:
        for waiter in self.waiters:
            if not waiter.done():  # its publisher may have stopped waiting
                waiter.set_result(answer)

    def set_exception(self, error: BaseException) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(error)


def check_message(topic: str, body: bytes, max_msg_size: int) -> None:
    """Raise what publishing ``body`` to ``topic`` would, before anything is sent.

    ``ValueError`` (``MessageTooBig`` over ``max_msg_size``) or ``TypeError``.
    """
    encode_pub(topic, body)
    if len(body) > max_msg_size:
        raise MessageTooBig(len(body), max_msg_size)


def encode_batch(topic: str, bodies: Sequence[bytes], max_msg_size: int, max_body_size: int) -> bytes:
    """The MPUB of ``bodies``; ``ValueError`` (``MessageTooBig``) or ``TypeError`` for what nsqd would refuse."""
    command = encode_mpub(topic, bodies)
    for body in bodies:
        if len(body) > max_msg_size:
            raise MessageTooBig(len(body), max_msg_size)
    body_size = _MPUB_COUNT_SIZE + sum(_MPUB_SIZE_FIELD + len(body) for body in bodies)
    if body_size > max_body_size:
        raise ValueError(f"the batch of {body_size} bytes exceeds max_body_size ({max_body_size})")
    return command


OnMessage = Callable[[Message], None]
OnAnswered = Callable[["Connection", bool, bool], None]
OnClose = Callable[["Connection", BaseException | None], None]


class Connection(asyncio.Protocol):
    """A connection to one nsqd (see the module docstring)."""

    def __init__(
        self,
        address: str,
        options: ConnectionOptions,
        on_message: OnMessage | None,
        on_answered: OnAnswered | None,
        on_close: OnClose | None,
    ) -> None:
        self.address = address
        self.options = options
        self.negotiated: dict[str, Any] = {}
        self.in_flight = 0  # messages received and not answered yet
        self._ready_count = 0  # the last RDY sent
        self.max_msg_size = options.max_msg_size  # lowered to what nsqd says when it refuses a message as too big
        self._loop = asyncio.get_running_loop()
        self._frames = FrameReader(options.max_frame_size)
        # What this loop iteration sends, written in one transport.write at its end (see _flush).
        self._output: list[bytes] = []
        self._flush_scheduled = False
        self._publishes: list[Publish] = []  # made in this loop iteration, in order
        self._open_publishes: dict[str, Publish] = {}  # by topic: the ones further publishes join
        self._answers: deque[AnswerWaiter] = deque()
        self._drained: list[asyncio.Future[None]] = []  # wait_answered() callers
        self._transport: asyncio.Transport | None = None
        self.is_open = False  # connected, and not closing
        self._on_message = on_message
        self._on_answered = on_answered
        self._on_close = on_close
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: BaseException | None = None
        self._last_read = self._loop.time()
        self._liveness_timer: asyncio.TimerHandle | None = None
        self._reading_later = False
        self.answered_http = False  # the peer is an HTTP server (nsqd's HTTP port?)
        # snappy or deflate, once negotiated: what every read and the write of each loop iteration go through.
        self._compress: Callable[[bytes], bytes] | None = None
        self._decompress: Callable[[bytes], bytes] | None = None
        # While the handshake may switch the stream after an answer (TLS, compression): what
        # was read, unframed, and what waits for more of it (see _handshake_answer).
        self._handshake_buffer: bytearray | None = None
        self._handshake_waiter: asyncio.Future[None] | None = None
        # Given the publishes nsqd never ran, written after one it refused with a fatal error (it
        # reads no further): a producer sends them again; without one they fail as the connection does.
        self.on_unrun: Callable[[list[Publish]], None] | None = None

    @classmethod
    async def open(
        cls,
        address: str,
        options: ConnectionOptions,
        *,
        on_message: OnMessage | None = None,
        on_answered: OnAnswered | None = None,
        on_close: OnClose | None = None,
    ) -> Connection:
        """Connect to ``host:port``, IDENTIFY and AUTH; raises ``ConnectionError`` or ``CommandError``."""
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        connection = cls(address, options, on_message, on_answered, on_close)
        try:
            await _within(loop.create_connection(lambda: connection, host, port), options.connect_timeout)
        except BaseException as error:
            connection.abort()  # cancelled as the connection was made: closed, not leaked
            if isinstance(error, (OSError, asyncio.TimeoutError)):
                raise ConnectionFailed(f"cannot connect to nsqd at {address}: {error or 'timed out'}") from error
            raise
        try:
            await _within(connection._handshake(), options.connect_timeout)
        except BaseException as error:
            connection.abort()
            if connection.answered_http:
                raise _answered_http(address) from None
            if isinstance(error, asyncio.TimeoutError):
                raise ConnectionFailed(f"nsqd at {address} did not answer IDENTIFY in time") from error
            raise
        return connection

    async def _handshake(self) -> None:
        """IDENTIFY; the upgrades nsqd agreed to (TLS, then snappy or deflate); AUTH if nsqd requires it."""
        options = self.options
        upgrading = options.uses_tls or options.snappy or options.deflate
        # Answers are read unframed until IDENTIFY and the upgrades are over: after its answer
        # to IDENTIFY nsqd may switch the stream, so nothing may follow IDENTIFY until then.
        self._handshake_buffer = bytearray()
        self.send(MAGIC_V2)
        self.send(encode_identify(options.identify_body()))
        probing = not upgrading
        if probing:
            self._probe_tls_required()  # in the same write as IDENTIFY: no round trip of its own
        answer = await self._handshake_answer("IDENTIFY")
        self.negotiated = self._json_answer("IDENTIFY", answer) if answer != OK else {}
        if upgrading:
            await self._upgrade()
            probing = not self.negotiated.get("tls_v1")
            if probing:
                self._probe_tls_required()
        if probing:
            try:
                answer = await self._handshake_answer("IDENTIFY")
            except CommandError as error:
                if error.code == "E_INVALID" and error.description.endswith(_TLS_REQUIRED):
                    raise _tls_required(self.address) from error
                raise
            if answer != OK:
                raise self._protocol_broken("IDENTIFY", answer)
        # From now on frames go through the frame reader.
        rest, self._handshake_buffer = self._handshake_buffer, None
        if rest:
            self._frames.feed(rest)
            self._read_frames(_FRAMES_PER_ITERATION)
        if self.negotiated.get("auth_required"):
            if options.auth_secret is None:
                raise ConnectionFailed(f"nsqd at {self.address} requires AUTH and no auth_secret is configured")
            secret = options.auth_secret
            answer = await self.request(encode_auth(secret.encode() if isinstance(secret, str) else secret))
            auth = self.negotiated["auth"] = self._json_answer("AUTH", answer)
            logger.info(
                "authenticated to nsqd at %s as %r (%s permissions%s)",
                self.address,
                auth.get("identity", ""),
                auth.get("permission_count", "?"),
                f"; {auth['identity_url']}" if auth.get("identity_url") else "",
            )
        self._arm_liveness()

    def _probe_tls_required(self) -> None:
        """Ask, without TLS, whether nsqd requires it (``--tls-required``); ``_handshake`` reads the answer.

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
        self.send(NOP)
        self.send(encode_identify({**body, "sample_rate": options.sample_rate}))

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
            answer = await self._handshake_answer("TLS")
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
        buffer = self._handshake_buffer
        assert buffer is not None and self._transport is not None
        name = "snappy" if isinstance(stream, SnappyStream) else "deflate"
        self._decompress = stream.decompress
        self._compress = stream.compress
        compressed = bytes(buffer)
        buffer.clear()
        try:
            buffer += stream.decompress(compressed)
        except ProtocolError as error:
            raise ConnectionFailed(f"nsqd at {self.address}: {error}") from error
        answer = await self._handshake_answer(name)
        if answer != OK:
            raise self._protocol_broken(name, answer)

    async def _handshake_answer(self, command: str) -> bytes:
        """The next answer, read unframed: after it the stream may switch (see _handshake).

        An error frame raises ``CommandError``; heartbeats are skipped.
        """
        buffer = self._handshake_buffer
        assert buffer is not None
        while True:
            if len(buffer) >= 4:
                if buffer[:4] == b"HTTP":
                    self.answered_http = True
                    raise _answered_http(self.address)
                size = int.from_bytes(buffer[:4], "big")
                if not 4 <= size <= self.options.max_frame_size:
                    raise self._protocol_broken(command, bytes(buffer[:80]))
                if len(buffer) >= 4 + size:
                    frame_type = int.from_bytes(buffer[4:8], "big")
                    data = bytes(buffer[8 : 4 + size])
                    del buffer[: 4 + size]
                    if frame_type == FRAME_TYPE_RESPONSE and data != HEARTBEAT:
                        return data
                    if frame_type == FRAME_TYPE_ERROR:
                        code, _, description = data.decode("utf-8", "replace").partition(" ")
                        raise CommandError(code, description)
                    if frame_type != FRAME_TYPE_RESPONSE:
                        raise self._protocol_broken(command, data[:80])
                    continue
            if not self.is_open:
                raise ConnectionFailed(f"connection to nsqd at {self.address} closed before it answered {command}")
            self._handshake_waiter = self._loop.create_future()
            await self._handshake_waiter  # woken by data_received, failed by connection_lost

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
        self.is_open = True

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self._decompress is not None:
            try:
                data = self._decompress(data)
            except ProtocolError as error:
                logger.error("closing the connection to %s: %s", self.address, error)
                self.abort(error)
                return
        if self._handshake_buffer is not None:
            self._handshake_buffer += data
            if self._handshake_waiter is not None and not self._handshake_waiter.done():
                self._handshake_waiter.set_result(None)
            return
        self._frames.feed(data)
        if not self._reading_later:
            self._read_frames(_FRAMES_PER_ITERATION)

    def _read_frames(self, limit: int) -> None:
        """Handle up to ``limit`` buffered frames (0: all); the next ones in the next loop iteration."""
        self._reading_later = False
        read = 0
        try:
            for frame in self._frames:
                if isinstance(frame, MessageFrame):
                    self._receive_message(frame)
                elif isinstance(frame, ErrorFrame):
                    self._receive_error(frame.data)
                elif frame.data == HEARTBEAT:
                    self.send(NOP)
                else:
                    self._receive_answer(frame.data)
                if not self.is_open:  # closed by what it handled: the rest would go unanswered
                    return
                read += 1
                if read == limit:
                    self._reading_later = True
                    self._loop.call_soon(self._read_later)
                    return
        except ProtocolError as error:
            logger.error("closing the connection to %s: %s", self.address, error)
            self.abort(error)

    def _read_later(self) -> None:
        if self._reading_later and self.is_open:
            self._read_frames(_FRAMES_PER_ITERATION)

    def eof_received(self) -> bool:
        if self._reading_later:
            self._read_frames(0)  # what was put off comes before the end
        try:
            self._frames.feed_eof()
        except ProtocolError as error:
            self._error = error
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
        self._output.clear()
        error = self._error or exc
        lost = ConnectionFailed(f"connection to nsqd at {self.address} lost" + (f": {error}" if error else ""))
        lost.__cause__ = error
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_exception(lost)
        publishes, self._publishes = self._publishes, []
        self._open_publishes.clear()
        answers, self._answers = self._answers, deque()
        for answer in (*answers, *publishes):
            if not answer.done():
                answer.set_exception(lost)
        self._wake_drained()
        if not self._closed.done():
            self._closed.set_result(None)
        if self._on_close is not None:
            self._on_close(self, error)

    # --- frames -------------------------------------------------------------------

    def _receive_message(self, frame: MessageFrame) -> None:
        self.in_flight += 1
        if self._on_message is None:
            raise ProtocolError("nsqd sent a message to a connection that did not subscribe")
        self._on_message(Message(frame, self))

    def _receive_answer(self, data: bytes) -> None:
        if not self._answers:
            raise ProtocolError(f"nsqd sent {data[:80]!r} with no command waiting for an answer")
        answer = self._answers.popleft()
        if not answer.done():  # its caller may have stopped waiting
            answer.set_result(data)
        if not self._answers and self._drained:
            self._wake_drained()

    def _receive_error(self, data: bytes) -> None:
        code, _, description = data.decode("utf-8", "replace").partition(" ")
        error: Exception = CommandError(code, description)
        if code in NON_FATAL_ERRORS:
            logger.warning("nsqd at %s: %s", self.address, error)
            return
        too_big = _TOO_BIG.search(description) if code == "E_BAD_MESSAGE" else None
        if code == "E_INVALID" and description.endswith(_TLS_REQUIRED):
            error = _tls_required(self.address)
            error.__cause__ = CommandError(code, description)
        elif too_big is not None:
            size, limit = int(too_big.group(1)), int(too_big.group(2))
            self.max_msg_size = min(self.max_msg_size, limit)
            error = MessageTooBig(size, limit, refused_by=self.address)
            error.__cause__ = CommandError(code, description)
        elif code == "E_UNAUTHORIZED":
            error = Unauthorized(code, description, self.address)
        # A fatal error answers the oldest command; nsqd closes the connection after it.
        if self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(error)
            if self.on_unrun is not None:
                self._hand_over_unrun()
            if not self._answers:
                self._wake_drained()
        else:
            logger.error("nsqd at %s: %s", self.address, error)
        self._error = error
        self.close_soon()

    def _hand_over_unrun(self) -> None:
        """Give ``on_unrun`` the publishes after the refused command: nsqd stopped reading at it."""
        assert self.on_unrun is not None
        unrun = [answer for answer in self._answers if isinstance(answer, Publish)]
        unrun += self._publishes
        self._answers = deque(answer for answer in self._answers if not isinstance(answer, Publish))
        self._publishes = []
        self._open_publishes.clear()
        self._output.clear()  # nsqd reads none of it
        if unrun:
            self.on_unrun(unrun)

    # --- commands -------------------------------------------------------------------

    def send(self, command: bytes) -> None:
        """A command nsqd does not answer; coalesced with the others of this loop iteration."""
        if self.is_open:
            self._output.append(command)
            self._schedule_flush()

    def request(self, command: bytes) -> asyncio.Future[bytes]:
        """Send a command nsqd answers; the future gets the answer, ``CommandError`` or ``ConnectionError``."""
        answer: asyncio.Future[bytes] = self._loop.create_future()
        self.send_request(command, answer)
        return answer

    def send_request(self, command: bytes, answer: AnswerWaiter) -> None:
        """Send a command nsqd answers; ``answer`` gets the answer, ``CommandError`` or ``ConnectionError``."""
        if not self.is_open:
            answer.set_exception(ConnectionFailed(f"connection to nsqd at {self.address} is closed"))
            return
        self._answers.append(answer)
        self._output.append(command)
        self._schedule_flush()

    def publish(self, topic: str, body: bytes, answer: AnswerWaiter, *, delay: float = 0.0) -> None:
        """Publish ``body`` to ``topic`` (DPUB after ``delay`` seconds); ``answer`` gets nsqd's answer.

        Publishes to one topic in one loop iteration join one MPUB, split at
        max_body_size: an MPUB nsqd refuses fails every publish in it (so
        messages over ``SEPARATE_PUBLISH_SIZE`` go alone). Bad arguments raise
        ``ValueError`` (``MessageTooBig``) or ``TypeError`` at once.
        """
        size = len(body)
        if size > self.max_msg_size:
            raise MessageTooBig(size, self.max_msg_size)
        if not self.is_open:
            check_message(topic, body, self.max_msg_size)
            answer.set_exception(ConnectionFailed(f"connection to nsqd at {self.address} is closed"))
            return
        joined = None if delay or size > SEPARATE_PUBLISH_SIZE else self._open_publishes.get(topic)
        if joined is not None and joined.body_size + _MPUB_SIZE_FIELD + size <= self.options.max_body_size:
            if type(body) is not bytes or not size:
                encode_pub(topic, body)  # raises as it would for the first body
            joined.bodies.append(body)
            joined.body_size += _MPUB_SIZE_FIELD + size
            joined.waiters.append(answer)
            return
        if delay or size > SEPARATE_PUBLISH_SIZE:
            # In publish order: what comes next to the topic does not join an MPUB sent before this.
            self._open_publishes.pop(topic, None)
        if delay:
            publish = Publish(topic, encode_dpub(topic, round(delay * 1000), body))
        elif size > SEPARATE_PUBLISH_SIZE:
            publish = Publish(topic, encode_pub(topic, body))
        else:
            publish = self._open_publishes[topic] = Publish(topic, encode_pub(topic, body), body)
        publish.waiters.append(answer)
        self._publishes.append(publish)
        self._schedule_flush()

    def publish_again(self, publish: Publish) -> None:
        """Send ``publish`` as it was, once more: one another connection wrote and nsqd never ran."""
        self._open_publishes.pop(publish.topic, None)  # in publish order, as publish_batch
        self._publishes.append(publish)
        self._schedule_flush()

    def publish_batch(self, topic: str, bodies: Sequence[bytes], answer: AnswerWaiter) -> None:
        """Publish ``bodies`` in one MPUB of their own: all of them or none; later publishes to the topic follow it."""
        publish = Publish(topic, encode_batch(topic, bodies, self.max_msg_size, self.options.max_body_size))
        publish.waiters.append(answer)
        self._open_publishes.pop(topic, None)  # in publish order: what comes next does not join an MPUB before it
        self._publishes.append(publish)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:  # see _flush
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what this loop iteration sent, its publishes joined into MPUBs last, in one write.

        One write for many commands saves a system call each; publishes are
        encoded only now, so that all of one iteration's to a topic join one MPUB.
        """
        if self._publishes:
            publishes, self._publishes = self._publishes, []
            self._open_publishes.clear()
            for publish in publishes:
                self.send_request(publish.encode(), publish)  # still scheduled: no flush of its own
        output = self._output
        transport = self._transport
        if output and transport is not None and not transport.is_closing():
            data = output[0] if len(output) == 1 else b"".join(output)
            transport.write(data if self._compress is None else self._compress(data))
        output.clear()
        self._flush_scheduled = False

    @property
    def ready_count(self) -> int:
        """The last RDY sent."""
        return self._ready_count

    def set_ready(self, count: int) -> None:
        """Send RDY ``count`` unless it is the last one sent (capped by nsqd's max_rdy_count)."""
        count = min(count, self.negotiated.get("max_rdy_count", count))
        if count != self._ready_count and self.is_open:
            self._ready_count = count
            self.send(encode_rdy(count))

    def answered(self, command: bytes, *, requeued: bool, backoff: bool) -> None:
        """A message of this connection was answered with ``command`` (FIN or REQ)."""
        self.in_flight -= 1
        # The RDY this answer leads to goes first: a REQ ahead of a backoff's
        # RDY 0 would have nsqd hand the message straight back.
        if self._on_answered is not None:
            self._on_answered(self, requeued, backoff)
        self.send(command)

    # --- liveness and closing -------------------------------------------------------

    def _arm_liveness(self) -> None:
        interval = self.options.heartbeat_interval
        if interval > 0:
            self._liveness_timer = self._loop.call_at(self._last_read + 2 * interval, self._check_liveness)

    def _check_liveness(self) -> None:
        # nsqd sends a heartbeat every interval: two missed mean the peer is gone.
        if self._loop.time() >= self._last_read + 2 * self.options.heartbeat_interval:
            self._error = ConnectionFailed(f"no heartbeat from nsqd at {self.address}")
            logger.warning("%s", self._error)
            self.abort()
        else:
            self._arm_liveness()

    def close_soon(self) -> None:
        """Close after handling the frames put off and writing what is pending."""
        if self._reading_later and self.is_open:
            self._read_frames(0)  # answers nsqd sent already, and messages it counts as in flight here
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()
        self.is_open = False

    def abort(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()
        self.is_open = False

    async def wait_answered(self) -> None:
        """Wait until every command and publish made so far is answered, or the connection is lost."""
        self._flush()
        if self._answers:
            drained = self._loop.create_future()
            self._drained.append(drained)
            await drained

    def _wake_drained(self) -> None:
        drained, self._drained = self._drained, []
        for waiter in drained:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        """Close after writing what is pending, and wait until closed."""
        self.close_soon()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def when_closed(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback(self)`` once the connection is closed (at once if it is)."""
        if self._closed.done():
            callback(self)
        else:
            self._closed.add_done_callback(lambda _: callback(self))


async def _within(awaitable: Awaitable[T], timeout: float) -> T:
    """``awaitable``'s result within ``timeout`` seconds (else ``asyncio.TimeoutError``); cancelled with the caller.

    Not ``asyncio.wait_for``: before Python 3.12, when the awaitable finishes
    as the caller is cancelled, it returns the result and drops the
    cancellation, and a consumer being stopped went on to handshake with a
    connection it had just opened.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
