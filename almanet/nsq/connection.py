"""One client connection to an nsqd in steady state: pipelined commands and publishes, messages.

``Connection.open()`` connects and handshakes (the magic, IDENTIFY with
feature negotiation, TLS and compression, AUTH when nsqd requires it: see
``almanet.nsq.handshake``), then takes the stream over. ``request()``
sends a command that nsqd answers (SUB, CLS) and returns a future of its
answer; ``send_request()`` does the same for a waiter of the caller's. nsqd
answers in order, so answers are matched first in, first out, and any
number may be in flight. ``publish()`` publishes with a waiter of the
caller's: publishes to one topic made in one event-loop iteration go out as
one MPUB (one PUB when alone), so nsqd parses one command and sends one
answer for all of them; the commands of one iteration leave in one write.
``send()`` is for the commands nsqd does not answer (RDY, FIN, REQ, TOUCH,
NOP). Messages go to the ``on_message`` callback straight from
``data_received``: no task per message.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from almanet._speedups.frames import (
    ErrorFrame,
    FrameReader,
    MessageFrame,
    encode_dpub,
    encode_fin,
    encode_mpub,
    encode_pub,
    encode_rdy,
    encode_req,
    encode_touch,
)
from almanet.nsq.handshake import TLS_REQUIRED, Handshake, command_error, connect, tls_required_error
from almanet.nsq.options import ConnectionOptions, NsqdLimits
from almanet.wire.errors import ConnectionFailed, MessageTooBig, ProtocolError
from almanet.wire.protocol import HEARTBEAT, NOP

logger = logging.getLogger("almanet.nsq")

# Error frames nsqd sends without closing the connection; every other one is fatal.
NON_FATAL_ERRORS = frozenset({"E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"})
# nsqd's E_BAD_MESSAGE for a PUB, MPUB or DPUB message over its --max-msg-size.
_TOO_BIG = re.compile(r"message too big (\d+) > (\d+)")


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

    def publish(self, topic: str, body: bytes, answer: OnAnswer, join: Join | None = None) -> None:
        """Publish through the connection this message came by (see ``Connection.publish``).

        What a handler publishes in answer to it (a reply) leaves in one write with its FIN.
        """
        self._connection.publish(topic, body, answer, join=join)

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

    def parts(self, bodies: list[bytes]) -> list[MessagePart]:
        """This message as the items it carries (a batch), each answered on its own (see ``MessagePart``).

        Until it is answered, its connection counts the items beyond the
        first in its RDY (``Connection.carry``).
        """
        whole = _Whole(self, len(bodies))
        self._connection.carry(whole.left - 1)
        return [MessagePart(whole, body) for body in bodies]

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, attempts={self.attempts}, body={self.body[:40]!r})"


class _Whole:
    """A message split into parts: how many are not answered yet, and whether one was given back."""

    __slots__ = ("left", "message", "parts", "requeued")

    def __init__(self, message: Message, parts: int) -> None:
        self.message = message
        self.parts = parts
        self.left = parts
        self.requeued = False


class MessagePart(Message):
    """One item of a message that carries several, answered as a message is; its ``body`` is the item.

    The message is answered once all its parts are: FIN, or REQ when any
    part was given back (``req``), so that nsqd hands all of it out again.
    ``touch`` touches the message.
    """

    __slots__ = ("_whole",)

    def __init__(self, whole: _Whole, body: bytes) -> None:
        message = whole.message
        self.id = message.id
        self.body = body
        self.timestamp = message.timestamp
        self.attempts = message.attempts
        self._connection = message.connection
        self._answered = False
        self._whole = whole

    def touch(self) -> None:
        if self._answered:
            raise RuntimeError("the message was already answered")
        if not self._whole.message.answered:
            self._whole.message.touch()

    def _answer(self, command: bytes, *, requeued: bool, backoff: bool) -> None:
        if self._answered:
            raise RuntimeError("the message was already answered")
        self._answered = True
        whole = self._whole
        whole.requeued |= requeued
        whole.left -= 1
        if not whole.left:
            message = whole.message
            message.connection.carry(1 - whole.parts)
            if whole.requeued:
                message.req()
            else:
                message.fin()

    def __repr__(self) -> str:
        return f"MessagePart(id={self.id!r}, attempts={self.attempts}, body={self.body[:40]!r})"


class OnAnswer(Protocol):
    """What to do with nsqd's answer to a command (a publish, mostly), told once.

    ``answered`` with the answer (``OK``); ``failed`` with its
    ``CommandError``, or ``ConnectionError`` when the connection closed
    first. Publishes take one of these rather than a future each: a call,
    a reply or an MPUB's publishers are told directly.
    """

    def answered(self, answer: bytes, /) -> None: ...
    def failed(self, error: BaseException, /) -> None: ...


class FutureAnswer:
    """Tells an ``asyncio.Future`` nsqd's answer, unless its waiter stopped waiting (cancelled it)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future

    def answered(self, answer: bytes) -> None:
        if not self.future.done():
            self.future.set_result(answer)

    def failed(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


# MPUB's body: a message count, then each message's size and bytes.
_MPUB_COUNT_SIZE = 4
_MPUB_SIZE_FIELD = 4

# Frames handled per loop iteration; the rest wait for the next one. The
# commands and publishes they lead to then leave in a write per iteration
# while the rest is handled, so that nsqd and the peers behind it start on
# them at once rather than on everything a big read brought, at the end.
# (Measured: RPC with 256 calls in flight, about 1.5 times the throughput.)
_FRAMES_PER_ITERATION = 64


# How much the last message weighs in a connection's items a message (batches), and the
# average under which messages count as one item each again.
_ITEMS_WEIGHT = 0.25
_LONE = 1.05

# What joins the bodies published to a topic in one loop iteration into fewer
# messages of at most the size given (almanet.rpc.join_envelopes: batches).
Join = Callable[[list[bytes], int], list[bytes]]


class Publish:
    """One PUB, MPUB or DPUB to send, and what each publish in it does with nsqd's answer (an ``OnAnswer`` itself)."""

    __slots__ = ("bodies", "body_size", "command", "join", "largest", "topic", "waiters")

    def __init__(
        self, topic: str, command: bytes, first_body: bytes | None = None, largest: int = 0, join: Join | None = None
    ) -> None:
        self.topic = topic
        self.join = join  # bodies joined into fewer messages as the publish is sent, or None: a message each
        self.command = command  # PUB of the first body, or a command that takes no more (DPUB, explicit MPUB)
        self.bodies = [] if first_body is None else [first_body]  # the bodies coalesced, a waiter each
        self.body_size = _MPUB_COUNT_SIZE + sum(_MPUB_SIZE_FIELD + len(body) for body in self.bodies)
        self.largest = largest  # of a command that takes no more: its largest message
        self.waiters: list[OnAnswer] = []

    @classmethod
    def joined(cls, topic: str, bodies: list[tuple[bytes, OnAnswer]], join: Join | None) -> Publish:
        """The coalesced publish of ``bodies`` to ``topic``, each with its waiter."""
        publish = cls(topic, encode_pub(topic, bodies[0][0]), bodies[0][0], join=join)
        for body, _ in bodies[1:]:
            publish.bodies.append(body)
            publish.body_size += _MPUB_SIZE_FIELD + len(body)
        publish.waiters = [waiter for _, waiter in bodies]
        return publish

    def encode(self, max_msg_size: int, max_body_size: int) -> bytes:
        """The command: PUB of a lone body, else MPUB of the bodies (joined, if told how, within ``max_msg_size``).

        Joined bodies that would make the MPUB bigger than ``max_body_size``
        (their headers may outweigh the size fields they save) go unjoined.
        """
        bodies = self.bodies
        if len(bodies) < 2:
            return self.command
        if self.join is not None:
            joined = self.join(bodies, max_msg_size)
            if len(joined) == 1:
                return encode_pub(self.topic, joined[0])
            if _MPUB_COUNT_SIZE + sum(_MPUB_SIZE_FIELD + len(body) for body in joined) <= max_body_size:
                bodies = joined
        return encode_mpub(self.topic, bodies)

    def answered(self, answer: bytes) -> None:
        for waiter in self.waiters:
            waiter.answered(answer)

    def failed(self, error: BaseException) -> None:
        for waiter in self.waiters:
            waiter.failed(error)


def sort_out(publishes: list[Publish], limit: int, address: str) -> list[Publish]:
    """Of ``publishes``, what nsqd at ``address`` takes: each message over ``limit`` fails alone (``MessageTooBig``)."""
    kept = []
    for publish in publishes:
        if not publish.bodies:  # a command that takes no more: all of it, or none
            if publish.largest > limit:
                publish.failed(MessageTooBig(publish.largest, limit, refused_by=address))
            else:
                kept.append(publish)
        elif max(map(len, publish.bodies)) <= limit:
            kept.append(publish)
        else:
            fitting = []
            for body, waiter in zip(publish.bodies, publish.waiters, strict=True):
                if len(body) > limit:
                    waiter.failed(MessageTooBig(len(body), limit, refused_by=address))
                else:
                    fitting.append((body, waiter))
            if fitting:
                kept.append(Publish.joined(publish.topic, fitting, publish.join))
    return kept


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
        limits: NsqdLimits | None = None,
    ) -> None:
        self.address = address
        self.options = options
        self.negotiated: dict[str, Any] = {}
        self.in_flight = 0  # messages received and not answered yet
        self.carried = 0  # the items those messages carry beyond one each (batches: Message.parts)
        self.items_a_message = 1.0  # the items a message carries lately: an average of those received
        self._ready_share = 0  # the RDY the consumer gives this connection
        self._ready_count = 0  # the last RDY sent
        self.limits = limits or NsqdLimits(options)
        self._loop = asyncio.get_running_loop()
        self._frames = FrameReader(options.max_frame_size)
        # What this loop iteration sends, written in one transport.write at its end (see _flush).
        self._output: list[bytes] = []
        self._flush_scheduled = False
        self._publishes: list[Publish] = []  # made in this loop iteration, in order
        self._open_publishes: dict[str, Publish] = {}  # by topic: the ones further publishes join
        self._answers: deque[OnAnswer] = deque()
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
        # snappy or deflate, once negotiated: what every read and the write of each loop iteration go through.
        self._compress: Callable[[bytes], bytes] | None = None
        self._decompress: Callable[[bytes], bytes] | None = None
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
        limits: NsqdLimits | None = None,
    ) -> Connection:
        """Connect to ``host:port``, IDENTIFY, upgrade and AUTH (see ``almanet.nsq.handshake``).

        Raises ``ConnectionError`` or ``CommandError``.
        """
        connection = cls(address, options, on_message, on_answered, on_close, limits)
        await connect(address, options, connection._start)
        return connection

    def _start(self, handshake: Handshake) -> None:
        """Take the stream over from ``handshake``, which is over: the steady state from here on."""
        self.negotiated = handshake.negotiated
        if handshake.compression is not None:
            self._compress = handshake.compression.compress
            self._decompress = handshake.compression.decompress
        rest = handshake.hand_over(self)
        self._last_read = self._loop.time()  # the handshake's last answer, just read: liveness counts from it
        if rest:
            self._frames.feed(rest)
            self._read_frames(_FRAMES_PER_ITERATION)
        self._arm_liveness()

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
        publishes, self._publishes = self._publishes, []
        self._open_publishes.clear()
        answers, self._answers = self._answers, deque()
        for answer in (*answers, *publishes):
            answer.failed(lost)
        self._wake_drained()
        if not self._closed.done():
            self._closed.set_result(None)
        if self._on_close is not None:
            self._on_close(self, error)

    # --- frames -------------------------------------------------------------------

    def _receive_message(self, frame: MessageFrame) -> None:
        self.in_flight += 1
        if self.items_a_message > 1.0:  # batches came: one item more in the average (carry adds the rest)
            decayed = 1.0 + (self.items_a_message - 1.0) * (1.0 - _ITEMS_WEIGHT)
            self.items_a_message = decayed if decayed > _LONE else 1.0  # lone again: no more work a message
            self._send_ready()
        if self._on_message is None:
            raise ProtocolError("nsqd sent a message to a connection that did not subscribe")
        self._on_message(Message(frame, self))

    def _receive_answer(self, data: bytes) -> None:
        if not self._answers:
            raise ProtocolError(f"nsqd sent {data[:80]!r} with no command waiting for an answer")
        self._answers.popleft().answered(data)
        if not self._answers and self._drained:
            self._wake_drained()

    def _receive_error(self, data: bytes) -> None:
        refused = command_error(data, self.address)  # Unauthorized for E_UNAUTHORIZED
        code, description = refused.code, refused.description
        if code in NON_FATAL_ERRORS:
            logger.warning("nsqd at %s: %s", self.address, refused)
            return
        error: Exception = refused
        too_big = _TOO_BIG.search(description) if code == "E_BAD_MESSAGE" else None
        if code == "E_INVALID" and description.endswith(TLS_REQUIRED):
            error = tls_required_error(self.address)
            error.__cause__ = refused
        elif too_big is not None:
            size, limit = int(too_big.group(1)), int(too_big.group(2))
            self.limits.refused_as_too_big(limit)
            error = MessageTooBig(size, limit, refused_by=self.address)
            error.__cause__ = refused
        # A fatal error answers the oldest command; nsqd closes the connection after it.
        if self._answers:
            refused_command = self._answers.popleft()
            if self.on_unrun is not None:
                self._hand_over_unrun(refused_command, error)
            else:
                refused_command.failed(error)
            if not self._answers:
                self._wake_drained()
        else:
            logger.error("nsqd at %s: %s", self.address, error)
        self._error = error
        self.close_soon()

    def _hand_over_unrun(self, refused: OnAnswer, error: Exception) -> None:
        """Fail what nsqd refused; give ``on_unrun`` what it did not run and will take.

        nsqd stops reading at a fatal error: the publishes after it never ran.
        Of a coalesced MPUB refused for a message too big, only the messages
        over nsqd's limit fail; the others go again.
        """
        assert self.on_unrun is not None
        unrun = [answer for answer in self._answers if isinstance(answer, Publish)]
        unrun += self._publishes
        self._answers = deque(answer for answer in self._answers if not isinstance(answer, Publish))
        self._publishes = []
        self._open_publishes.clear()
        self._output.clear()  # nsqd reads none of it
        if isinstance(error, MessageTooBig) and isinstance(refused, Publish) and len(refused.bodies) > 1:
            unrun.insert(0, refused)
        else:
            refused.failed(error)
        unrun = sort_out(unrun, self.limits.max_msg_size, self.address)
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
        self.send_request(command, FutureAnswer(answer))
        return answer

    def send_request(self, command: bytes, answer: OnAnswer) -> None:
        """Send a command nsqd answers; ``answer`` gets the answer, ``CommandError`` or ``ConnectionError``."""
        if not self.is_open:
            answer.failed(ConnectionFailed(f"connection to nsqd at {self.address} is closed"))
            return
        self._answers.append(answer)
        self._output.append(command)
        self._schedule_flush()

    def publish(
        self, topic: str, body: bytes, answer: OnAnswer, *, delay: float = 0.0, join: Join | None = None
    ) -> None:
        """Publish ``body`` to ``topic`` (DPUB after ``delay`` seconds); ``answer`` gets nsqd's answer.

        Publishes to one topic in one loop iteration join one MPUB, split at
        max_body_size; given ``join``, their bodies are joined into fewer
        messages as the MPUB is sent (what the iteration's first publish to
        the topic said goes for all). An MPUB nsqd refuses fails every publish in it, but on a
        producer's connection (``on_unrun``): refused for a message too big,
        the others go again. Bad arguments raise ``ValueError``
        (``MessageTooBig``) or ``TypeError`` at once.
        """
        size = len(body)
        if size > self.limits.max_msg_size:
            raise MessageTooBig(size, self.limits.max_msg_size)
        if not self.is_open:
            check_message(topic, body, self.limits.max_msg_size)
            answer.failed(ConnectionFailed(f"connection to nsqd at {self.address} is closed"))
            return
        joined = None if delay else self._open_publishes.get(topic)
        if joined is not None and joined.body_size + _MPUB_SIZE_FIELD + size <= self.options.max_body_size:
            if type(body) is not bytes or not size:
                encode_pub(topic, body)  # raises as it would for the first body
            joined.bodies.append(body)
            joined.body_size += _MPUB_SIZE_FIELD + size
            joined.waiters.append(answer)
            return
        if delay:
            # In publish order: what comes next to the topic does not join an MPUB sent before this.
            self._open_publishes.pop(topic, None)
            publish = Publish(topic, encode_dpub(topic, round(delay * 1000), body), largest=size)
        else:
            publish = self._open_publishes[topic] = Publish(topic, encode_pub(topic, body), body, join=join)
        publish.waiters.append(answer)
        self._publishes.append(publish)
        self._schedule_flush()

    def publish_again(self, publish: Publish) -> None:
        """Send ``publish`` as it was, once more: one another connection wrote and nsqd never ran."""
        self._open_publishes.pop(publish.topic, None)  # in publish order, as publish_batch
        self._publishes.append(publish)
        self._schedule_flush()

    def publish_batch(self, topic: str, bodies: Sequence[bytes], answer: OnAnswer) -> None:
        """Publish ``bodies`` in one MPUB of their own: all of them or none; later publishes to the topic follow it."""
        command = encode_batch(topic, bodies, self.limits.max_msg_size, self.options.max_body_size)
        publish = Publish(topic, command, largest=max(map(len, bodies), default=0))
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
            max_msg_size, max_body_size = self.limits.max_msg_size, self.options.max_body_size
            for publish in publishes:
                self.send_request(publish.encode(max_msg_size, max_body_size), publish)  # no flush of its own
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
        """Take ``count`` messages in flight at most: RDY (capped by nsqd's max_rdy_count), less what batches carry.

        nsqd counts messages; a consumer that runs the items of batches one
        by one means ``count`` items. Once batches come (``carry``), the RDY
        sent lets nsqd send as many more messages as the items room left
        makes at the items a message lately (an average that lone messages
        bring back to one), so that a burst of batches does not wait here
        while other consumers are free.
        """
        self._ready_share = count
        self._send_ready()

    def carry(self, extra: int) -> None:
        """The messages in flight here carry ``extra`` more items (or fewer) than one each: see ``set_ready``.

        ``extra`` > 0: the message just received carries ``extra + 1``.
        """
        self.carried += extra
        if extra > 0:
            self.items_a_message += extra * _ITEMS_WEIGHT
        self._send_ready()

    def _send_ready(self) -> None:
        share, carried, in_flight, per_message = self._ready_share, self.carried, self.in_flight, self.items_a_message
        count = share
        if share and (carried or per_message > _LONE):
            # Batches come: as many more messages as the items room left makes, at the items a message lately
            # (one at least, nothing in flight); not resent for a change under a sixteenth of the share in items.
            room = share - in_flight - carried
            count = max(in_flight + int(max(0, room) / per_message), 1)
            if abs(count - self._ready_count) < max(1, int(share / 16 / per_message)):
                return
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
