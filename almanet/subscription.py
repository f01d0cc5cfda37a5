"""Produce and consume: the body a payload is produced as, and the messages a subscription hands out.

A produced body is the payload msgpack-encoded. With an observer installed
(``almanet.observer``: tracing) it is that body wrapped with the trace
context, as one msgpack ext value (``traced_body``), which a subscription
unwraps: docs/PROTOCOL.md, "Traced bodies".
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import msgpack

from almanet import conversion, observer
from almanet.errors import UnreadableBody
from almanet.nsq import Consumer, Message
from almanet.observer import Consumed

# The msgpack ext type of a body wrapped with headers: its data is the msgpack array [headers, body].
TRACED_BODY_EXT = 84
_EXT_MARKERS = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})  # the first byte of each ext format


def encode_payload(payload: Any, raw: bool) -> bytes:
    """A produced message's body: ``payload`` msgpack-encoded, or as it is when ``raw`` (then bytes only)."""
    if not raw:
        try:
            return msgpack.packb(payload)  # type: ignore[no-any-return]
        except (TypeError, OverflowError) as refused:  # a dataclass, an enum...: sent as builtins
            return conversion.encode_as_builtins(msgpack.packb, payload, refused)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"a raw body is bytes, not {type(payload).__name__}")
    return bytes(payload)


def traced_body(headers: dict[str, str], body: bytes) -> bytes:
    """``body`` wrapped with ``headers`` (the trace context), as ``ConsumedMessage`` unwraps it."""
    return msgpack.packb(msgpack.ExtType(TRACED_BODY_EXT, msgpack.packb([headers, body])))  # type: ignore[no-any-return]


def untraced(body: bytes) -> tuple[dict[str, str] | None, bytes]:
    """The headers a body produced by ``traced_body`` carries, and the body it wraps; else None and ``body``."""
    if not body or body[0] not in _EXT_MARKERS:
        return None, body
    try:
        value = msgpack.unpackb(body)
        if type(value) is msgpack.ExtType and value.code == TRACED_BODY_EXT:
            headers, inner = msgpack.unpackb(value.data, raw=False)
            if (
                type(headers) is dict
                and type(inner) is bytes
                and all(type(name) is str and type(text) is str for name, text in headers.items())
            ):
                return headers, inner
    except Exception:  # not one: a payload of its own, read as it is
        pass
    return None, body


class ConsumedMessage:
    """A message of a consumed topic: commit it (FIN) or roll it back (REQ) once; ``touch()`` meanwhile.

    ``body`` is what was produced (unwrapped from the trace context it may
    carry: ``headers``, None when it carries none).
    """

    __slots__ = ("_message", "_observed", "attempts", "body", "headers", "id", "timestamp")

    def __init__(self, message: Message) -> None:
        self._message = message
        body = message.body
        self.headers: dict[str, str] | None = None
        if body and body[0] in _EXT_MARKERS:  # the first byte's check here: a call less a message
            self.headers, body = untraced(body)
        self.body: bytes = body
        self.id: bytes = message.id
        self.timestamp: int = message.timestamp  # ns since the epoch, when published
        self.attempts: int = message.attempts
        self._observed: Consumed | None = None

    @property
    def payload(self) -> Any:
        """What ``produce`` sent (the body decoded as one msgpack value); ``UnreadableBody`` for another body."""
        try:
            return msgpack.unpackb(self.body, raw=False, strict_map_key=False)
        except Exception as error:  # msgpack raises ValueError subclasses and others (FormatError, StackError)
            raise UnreadableBody(
                f"message {self.id.decode(errors='replace')} is not one msgpack value ({type(error).__name__}: "
                f"{error}): produced raw or by another client? Read its .body"
            ) from None

    def commit(self) -> None:
        """Done with it (FIN)."""
        self._message.fin()
        if self._observed is not None:
            self._observed.answered(True)

    def rollback(self, delay: float = 0.0) -> None:
        """Give it back for redelivery after ``delay`` seconds (REQ); its attempts grow by one."""
        self._message.req(delay)
        if self._observed is not None:
            self._observed.answered(False)

    def touch(self) -> None:
        """Restart its msg_timeout (TOUCH)."""
        self._message.touch()

    @property
    def answered(self) -> bool:
        """Whether it was committed or rolled back."""
        return self._message.answered

    def __repr__(self) -> str:
        return f"ConsumedMessage(id={self.id!r}, attempts={self.attempts}, body={self.body[:40]!r})"


class Subscription:
    """The messages of a topic through a channel, as an async iterator.

    ``async for message in session.consume(topic, channel)``, or ``async with``
    it, or the pair form ``stream, stop = await session.consume(...)``.
    Stopping gives back at once the messages received and not handed out yet.
    Leaving an ``async for`` loop (``break``, or an exception in its body)
    stops the subscription and rolls back, at once, the messages the loop was
    handed and did not commit or roll back by the time it ended (code that
    commits them right after the loop, before awaiting anything, still does).
    """

    def __init__(self, consumer_of: Callable[[Callable[[Message], None]], Consumer]) -> None:
        self._consumer = consumer_of(self._receive)
        self._received: deque[ConsumedMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._stopped = False

    def _receive(self, message: Message) -> None:
        if self._stopped:  # sent before nsqd had our RDY 0: back at once
            message.req()
            return
        consumed = ConsumedMessage(message)
        watching = observer.current
        if watching is not None:
            consumer = self._consumer
            consumed._observed = watching.consumed(
                consumer.topic,
                consumer.channel,
                consumed.headers,
                message.connection.address,
                len(message.body),
                message.attempts,
                message.id,
            )
        self._received.append(consumed)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._consumer.start())
        await self._started

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming: requeue what was not handed out, wait up to ``timeout`` for the rest to be answered."""
        await self._stop_soon(timeout)

    def _stop_soon(self, timeout: float) -> asyncio.Future[None]:
        """``stop``'s RDY 0 and requeues now; what waits for the rest."""
        self._stopped = True
        stopped = self._consumer.stop(timeout)  # RDY 0 first: what is rolled back now is not sent back here
        received, self._received = self._received, deque()
        for message in received:
            message.rollback()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return stopped

    def __aiter__(self) -> AsyncIterator[ConsumedMessage]:
        return self._handed_out()

    async def _handed_out(self) -> AsyncIterator[ConsumedMessage]:
        """The messages, to an ``async for`` loop; what it leaves unanswered is rolled back if it is left early.

        Leaving the loop (``break``, an exception in its body) closes this
        generator: asyncio schedules ``aclose()`` once the loop lets go of it.
        Without the rollback nsqd would hand the messages out again only
        after their msg_timeout. A loop that ends because the subscription
        stopped rolls back nothing: ``stop()`` waits for what is handled.
        """
        handed: list[ConsumedMessage] = []  # those not known to be answered; the answered are dropped as we go
        stopped_by_itself = False
        try:
            while True:
                try:
                    message = await self.__anext__()
                except StopAsyncIteration:
                    stopped_by_itself = True
                    return
                if handed and handed[-1].answered:  # committed before the next one: kept at one, one at a time
                    handed.pop()
                if len(handed) > 2 * self._consumer.max_in_flight:  # nsqd hands out no more unanswered than that
                    handed = [kept for kept in handed if not kept.answered]
                handed.append(message)
                yield message
        finally:
            if not stopped_by_itself:
                stopped = self._stop_soon(10.0)  # RDY 0 before the rollbacks, or nsqd hands them straight back here
                for message in handed:
                    if not message.answered:
                        message.rollback()
                await stopped

    async def __anext__(self) -> ConsumedMessage:
        if self._started is None or not self._started.done():
            await self.start()
        while not self._received:
            if self._stopped:
                raise StopAsyncIteration
            waiter = self._waiter
            if waiter is None or waiter.done():  # else other readers wait: one future wakes them all
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._received.popleft()

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __await__(self) -> Generator[Any, None, tuple[Subscription, Callable[[], Any]]]:
        return self._as_pair().__await__()

    async def _as_pair(self) -> tuple[Subscription, Callable[[], Any]]:
        await self.start()
        return self, self.stop
