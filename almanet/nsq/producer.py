"""Publishing to nsqd: publishes coalesced into MPUB, pipelined on one connection, with failover.

Publishes to a topic made in the same event-loop iteration go out together as
one MPUB (one PUB when there is one): nsqd parses one command and sends one
answer for them all, and each publisher gets that answer. ``publish_batch``
is an explicit MPUB of its own; deferred publishes are DPUBs. Any number of
commands may be in flight on the connection; nsqd answers them in order.

Without a connection, publishes wait while it connects to the first nsqd
address that answers, starting with the last one that worked: nothing
reconnects in the background, and a publish never waits longer than a
connection attempt per address. Publishes in flight when the connection is
lost fail at once with ``ConnectionError``; an MPUB nsqd refuses fails all the
publishes in it (MPUB is all or nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from almanet._speedups.frames import encode_dpub, encode_mpub, encode_pub
from almanet.nsq.connection import AnswerWaiter, Connection, ConnectionOptions
from almanet.nsq.protocol import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_MSG_SIZE

logger = logging.getLogger("almanet.nsq")

# MPUB's body: a message count, then each message's size and bytes.
_MPUB_COUNT_SIZE = 4
_MPUB_SIZE_FIELD = 4


class _Batch:
    """One command to send, and the publishers waiting for nsqd's answer to it (see ``AnswerWaiter``)."""

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


class Producer:
    """Publishes to the first reachable of ``nsqd_tcp_addresses`` (``host:port``)."""

    def __init__(
        self,
        *nsqd_tcp_addresses: str,
        options: ConnectionOptions | None = None,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if not nsqd_tcp_addresses:
            raise ValueError("a producer needs at least one nsqd address")
        self.addresses = list(nsqd_tcp_addresses)
        self.options = options or ConnectionOptions()
        self.max_msg_size = max_msg_size
        self.max_body_size = max_body_size
        self._connection: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._next_address = 0
        self._closed = False
        self._batches: list[_Batch] = []  # made in this loop iteration, in publish order
        self._open_batches: dict[str, _Batch] = {}  # by topic: the batches further publishes join
        self._unsent: list[_Batch] = []  # waiting for a connection
        self._connect_and_send_task: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop

    async def __aenter__(self) -> Producer:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def publish(self, topic: str, body: bytes, *, delay: float = 0.0) -> asyncio.Future[bytes]:
        """Publish one message, or defer it by ``delay`` seconds (DPUB).

        The arguments are checked at once (``ValueError``, ``TypeError``); the
        future completes with nsqd's ``OK``, or raises ``CommandError`` or
        ``ConnectionError``. A plain function, not a coroutine: nothing but
        the future per publish on this hot path.
        """
        answer: asyncio.Future[bytes] = self._loop_of_publishes().create_future()
        self.publish_with(answer, topic, body, delay=delay)
        return answer

    def publish_with(self, answer: AnswerWaiter, topic: str, body: bytes, *, delay: float = 0.0) -> None:
        """``publish``, telling nsqd's answer to ``answer`` instead of a new future (for callers that have one)."""
        size = len(body)
        if size > self.max_msg_size:
            raise ValueError(f"a message of {size} bytes exceeds max_msg_size ({self.max_msg_size})")
        if delay:
            batch = self._add(_Batch(topic, encode_dpub(topic, round(delay * 1000), body)))
        else:
            open_batch = self._open_batches.get(topic)
            if open_batch is None or open_batch.body_size + _MPUB_SIZE_FIELD + size > self.max_body_size:
                batch = self._open_batches[topic] = self._add(_Batch(topic, encode_pub(topic, body), body))
            else:
                if type(body) is not bytes or not size:
                    encode_pub(topic, body)  # raises as it would for the first body
                batch = open_batch
                batch.bodies.append(body)
                batch.body_size += _MPUB_SIZE_FIELD + size
        batch.waiters.append(answer)

    def publish_batch(self, topic: str, bodies: Sequence[bytes]) -> asyncio.Future[bytes]:
        """Publish several messages in one MPUB: all of them or, on error, none (as ``publish``)."""
        command = encode_mpub(topic, bodies)
        for body in bodies:
            if len(body) > self.max_msg_size:
                raise ValueError(f"a message of {len(body)} bytes exceeds max_msg_size ({self.max_msg_size})")
        body_size = _MPUB_COUNT_SIZE + sum(_MPUB_SIZE_FIELD + len(body) for body in bodies)
        if body_size > self.max_body_size:
            raise ValueError(f"the batch of {body_size} bytes exceeds max_body_size ({self.max_body_size})")
        batch = self._add(_Batch(topic, command))
        answer: asyncio.Future[bytes] = self._loop_of_publishes().create_future()
        batch.waiters.append(answer)
        return answer

    def _loop_of_publishes(self) -> asyncio.AbstractEventLoop:
        # Looked up once per loop iteration, not per publish.
        return self._loop if self._flush_scheduled else asyncio.get_running_loop()

    def _add(self, batch: _Batch) -> _Batch:
        if self._closed:
            raise ConnectionError("the producer is closed")
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)
        self._batches.append(batch)
        return batch

    def _flush(self) -> None:
        """Send this loop iteration's batches, in one write."""
        self._flush_scheduled = False
        batches, self._batches = self._batches, []
        self._open_batches.clear()
        connection = self._connection
        if self._unsent or connection is None or not connection.is_open:
            # Behind the ones already waiting: publishes leave in order.
            if self._connect_and_send_task is None:
                self._connect_and_send_task = asyncio.ensure_future(self._connect_and_send())
            self._unsent.extend(batches)
            return
        self._send(connection, batches)

    @staticmethod
    def _send(connection: Connection, batches: list[_Batch]) -> None:
        for batch in batches:
            connection.send_request(batch.encode(), batch)
        connection.flush()

    async def _connect_and_send(self) -> None:
        try:
            connection = await self.connect()
        except ConnectionError as error:
            unsent, self._unsent = self._unsent, []
            for batch in unsent:
                batch.set_exception(error)
        else:
            unsent, self._unsent = self._unsent, []
            self._send(connection, unsent)
        finally:
            self._connect_and_send_task = None

    async def connect(self) -> Connection:
        """The live connection, opened if need be (trying each address once)."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._closed:
            raise ConnectionError("the producer is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open_first())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def close(self) -> None:
        """Close the connection once the publishes made so far are answered."""
        if self._batches:
            self._flush()
        if self._connect_and_send_task is not None:
            await self._connect_and_send_task  # the publishes waiting for a connection are sent, or failed
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.wait_answered()
            await connection.close()

    async def _open_first(self) -> Connection:
        errors = []
        count = len(self.addresses)
        for offset in range(count):
            index = (self._next_address + offset) % count
            address = self.addresses[index]
            try:
                connection = await Connection.open(address, self.options)
            except ConnectionError as error:
                errors.append(str(error))
                continue
            if self._closed:  # while connecting
                await connection.close()
                raise ConnectionError("the producer is closed")
            if offset:
                logger.warning("publishing to %s (failed over: %s)", address, "; ".join(errors))
            self._next_address = index
            self._connection = connection
            return connection
        raise ConnectionError("no nsqd reachable: " + "; ".join(errors))
