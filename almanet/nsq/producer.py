"""Publishing to nsqd, with failover: PUB, MPUB and DPUB pipelined on one connection.

Publishes to one topic made in one event-loop iteration go out as one MPUB
(see ``Connection.publish``); ``publish_batch`` is an explicit MPUB of its
own; deferred publishes are DPUBs. Any number may be in flight; nsqd answers
them in order. Without a connection, publishes wait, in order, while the
producer connects to the first nsqd address that answers, starting with the
last one that worked: nothing reconnects in the background, and a publish
never waits longer than a connection attempt per address. Publishes in
flight when the connection is lost fail at once with ``ConnectionError``,
but those written after one nsqd refused (``MessageTooBig``,
``Unauthorized``): nsqd closes the connection without running them, and
they are sent again on a new one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

from almanet.loops import within
from almanet.nsq.connection import Connection, FutureAnswer, OnAnswer, Publish, check_message, encode_batch
from almanet.nsq.options import ConnectionOptions, NsqdLimits
from almanet.wire.addresses import split_address
from almanet.wire.errors import ConnectionFailed, ProtocolError

logger = logging.getLogger("almanet.nsq")


class Producer:
    """Publishes to the first reachable of ``nsqd_tcp_addresses`` (``host:port``)."""

    def __init__(self, *nsqd_tcp_addresses: str, options: ConnectionOptions | None = None) -> None:
        if not nsqd_tcp_addresses:
            raise ValueError("a producer needs at least one nsqd address")
        for address in nsqd_tcp_addresses:
            split_address(address)  # ValueError now, not at the first publish
        self.addresses = list(nsqd_tcp_addresses)
        self.options = options or ConnectionOptions()
        self.limits = NsqdLimits(self.options)  # its connections'
        self._connection: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._next_address = 0
        self._closing = False  # close() began: no more publishes
        self._closed = False  # no more connections either
        # Publishes made while there is no connection, sent in order once it opens: how, and who waits.
        self._unsent: list[tuple[Callable[[Connection], None], OnAnswer]] = []
        self._connect_and_send_task: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Producer:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected_to(self) -> str | None:
        """The address of the nsqd it publishes to now; None while it has no connection open."""
        connection = self._connection
        return connection.address if connection is not None and connection.is_open else None

    def publish(self, topic: str, body: bytes, *, delay: float = 0.0) -> asyncio.Future[bytes]:
        """Publish one message, or defer it by ``delay`` seconds (DPUB).

        The arguments are checked at once (``ValueError``, ``TypeError``); the
        future completes with nsqd's ``OK``, or raises ``CommandError`` or
        ``ConnectionError``. A plain function, not a coroutine: nothing but
        the future per publish on this hot path.
        """
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.publish_with(FutureAnswer(answer), topic, body, delay=delay)
        return answer

    def publish_with(self, answer: OnAnswer, topic: str, body: bytes, *, delay: float = 0.0) -> None:
        """``publish``, telling nsqd's answer to ``answer`` instead of a new future (for callers that have one)."""
        connection = self._connection
        if connection is not None and connection.is_open and not self._unsent and not self._closing:
            connection.publish(topic, body, answer, delay=delay)
            return
        check_message(topic, body, self.limits.max_msg_size)
        self._send_when_connected(
            functools.partial(Connection.publish, topic=topic, body=body, answer=answer, delay=delay), answer
        )

    def publish_batch(self, topic: str, bodies: Sequence[bytes]) -> asyncio.Future[bytes]:
        """Publish several messages in one MPUB: all of them or, on error, none (as ``publish``)."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        answer = FutureAnswer(future)
        connection = self._connection
        if connection is not None and connection.is_open and not self._unsent and not self._closing:
            connection.publish_batch(topic, bodies, answer)
        else:
            batch = list(bodies)
            encode_batch(topic, batch, self.limits.max_msg_size, self.options.max_body_size)  # checks them now
            self._send_when_connected(
                functools.partial(Connection.publish_batch, topic=topic, bodies=batch, answer=answer), answer
            )
        return future

    def _publish_again(self, unrun: list[Publish]) -> None:
        """The publishes nsqd never ran, as it refused one before them and closed: sent first on a new connection."""
        if self._closed:
            failed = ConnectionFailed("the producer closed before publishes nsqd had not run could be sent again")
            for publish in unrun:
                publish.failed(failed)
            return
        again = [(functools.partial(Connection.publish_again, publish=publish), publish) for publish in unrun]
        self._unsent[:0] = again
        if self._connect_and_send_task is None:
            self._connect_and_send_task = asyncio.ensure_future(self._connect_and_send())

    def _send_when_connected(self, send: Callable[[Connection], None], answer: OnAnswer) -> None:
        if self._closing:
            raise ConnectionFailed("the producer is closed")
        self._unsent.append((send, answer))
        if self._connect_and_send_task is None:
            self._connect_and_send_task = asyncio.ensure_future(self._connect_and_send())

    async def _connect_and_send(self) -> None:
        try:
            connection = await self.connect()
        except BaseException as error:
            unsent, self._unsent = self._unsent, []
            failed = error if isinstance(error, ConnectionError) else ConnectionFailed("the producer closed first")
            for _, answer in unsent:
                answer.failed(failed)
            if not isinstance(error, Exception):
                raise
        else:
            unsent, self._unsent = self._unsent, []
            for send, _ in unsent:
                send(connection)  # checked when published, against the same limits
        finally:
            self._connect_and_send_task = None

    async def connect(self) -> Connection:
        """The live connection, opened if need be (trying each address once)."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._closed:
            raise ConnectionFailed("the producer is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open_first())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def close(self, timeout: float = 10.0) -> None:
        """Close the connection once the publishes made so far are answered, waiting ``timeout`` at most.

        Publishes still unanswered then fail with ``ConnectionError``.
        """
        try:
            await within(self._settle(), timeout)
            settled = True
        except asyncio.TimeoutError:
            logger.warning("closing the connection with publishes unanswered after %g s", timeout)
            settled = False
        self._closing = self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            if settled:
                await connection.close()
            else:
                connection.abort()  # nsqd does not answer: it may not read what is left either

    async def _settle(self) -> None:
        self._closing = True
        while True:
            if self._connect_and_send_task is not None:
                # Shielded: at the timeout it goes on, and fails what waits as the producer is closed by then.
                await asyncio.shield(self._connect_and_send_task)
            if self._connection is not None:
                await self._connection.wait_answered()
            if self._connect_and_send_task is None:  # nothing is to be sent again (after a refusal)
                return

    async def _open_first(self) -> Connection:
        errors = []
        count = len(self.addresses)
        for offset in range(count):
            index = (self._next_address + offset) % count
            address = self.addresses[index]
            try:
                connection = await Connection.open(address, self.options, limits=self.limits)
            except (ConnectionError, ProtocolError) as error:  # refused IDENTIFY or AUTH too: try the next one
                errors.append(str(error))
                continue
            if self._closed:  # while connecting
                await connection.close()
                raise ConnectionFailed("the producer is closed")
            connection.on_unrun = self._publish_again
            if offset:
                logger.warning("publishing to %s (failed over: %s)", address, "; ".join(errors))
            self._next_address = index
            self._connection = connection
            return connection
        raise ConnectionFailed("no nsqd reachable: " + "; ".join(errors))
