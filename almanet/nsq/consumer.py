"""Consuming a topic through a channel, from nsqd instances given or found via nsqlookupd.

Every message goes to the ``on_message`` callback, called from the
connection's ``data_received`` (no task per message); it answers the
message now or later with ``fin()``, ``req()`` or ``touch()``. An exception
from the callback requeues the message with a delay growing with its
attempts. ``max_in_flight`` is shared out as RDY across the connections: nsqd
keeps sending to a connection while its in-flight count is below its RDY,
so answering a message makes room for the next one without another RDY.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from almanet import observer
from almanet._speedups.frames import check_name, encode_sub
from almanet.loops import within
from almanet.nsq.connection import Connection, Join, Message, OnAnswer, OnMessage
from almanet.nsq.lookupd import POLL_INTERVAL, NsqdWatch
from almanet.nsq.options import ConnectionOptions, NsqdLimits
from almanet.nsq.ready import ReadyCounts
from almanet.wire.addresses import split_address
from almanet.wire.errors import ConnectionFailed, ProtocolError
from almanet.wire.protocol import CLS

logger = logging.getLogger("almanet.nsq")


class Consumer:
    """Consumes ``topic`` through ``channel`` (see the module docstring).

    ``backoff``: after a message is requeued with ``backoff=True`` (or its
    callback raised), every connection gets RDY 0 for ``backoff_unit`` x 2^(n-1)
    seconds (n failures in a row, capped by ``max_backoff``), then one
    connection gets RDY 1 to probe; successes climb back out. Off by default.
    ``max_attempts``: a message delivered more often is given to
    ``on_give_up`` (default: logged) and FINed instead of being handled.

    ``ready_everywhere``: when ``max_in_flight`` is below the number of
    connections, every connection gets RDY 1 instead of a rotating few (a
    message on an nsqd left at RDY 0 waits for the rotation, seconds): up to
    one message per connection may then be in flight, and the handler holds
    what it cannot take yet (a service's procedure, its ``max_concurrency``).

    Besides ``nsqd_tcp_addresses``, it reads from the nsqd instances that the
    nsqlookupd ``lookupd_http_addresses`` list for the topic, asked every
    ``lookupd_poll_interval`` seconds; or from those an ``nsqd_watch`` of its
    owner's lists (a service's: every nsqd of the cluster).
    """

    def __init__(
        self,
        topic: str,
        channel: str,
        on_message: OnMessage,
        *,
        nsqd_tcp_addresses: Sequence[str] = (),
        lookupd_http_addresses: Sequence[str] = (),
        lookupd_poll_interval: float = POLL_INTERVAL,
        nsqd_watch: NsqdWatch | None = None,
        max_in_flight: int = 1,
        options: ConnectionOptions | None = None,
        requeue_delay: float = 1.0,
        max_attempts: int = 0,
        on_give_up: Callable[[Message], None] | None = None,
        backoff: bool = False,
        backoff_unit: float = 1.0,
        max_backoff: float = 120.0,
        ready_everywhere: bool = False,
    ) -> None:
        check_name("topic", topic)
        check_name("channel", channel)
        if lookupd_http_addresses and nsqd_watch is not None:
            raise ValueError("a consumer takes lookupd_http_addresses or an nsqd_watch, not both")
        if not nsqd_tcp_addresses and not lookupd_http_addresses and nsqd_watch is None:
            raise ValueError("a consumer needs nsqd_tcp_addresses, lookupd_http_addresses or an nsqd_watch")
        if max_in_flight < 0:
            raise ValueError("max_in_flight must not be negative")
        for address in nsqd_tcp_addresses:
            split_address(address)  # ValueError now, not at the first connection
        self.topic = topic
        self.channel = channel
        self.max_in_flight = max_in_flight
        self.options = options or ConnectionOptions()
        self.connections: dict[str, Connection] = {}
        self._publishing: Connection | None = None  # see publish()
        self.limits = NsqdLimits(self.options)  # its connections'
        self._on_message = on_message
        self._on_give_up = on_give_up
        self._direct = list(nsqd_tcp_addresses)
        # Its own watch of the topic, stopped with it; or its owner's, which it only listens to.
        self._own_watch = bool(lookupd_http_addresses)
        self._watch = NsqdWatch(lookupd_http_addresses, lookupd_poll_interval, topic) if self._own_watch else nsqd_watch
        self._discovered: frozenset[str] = frozenset()
        self._requeue_delay = requeue_delay
        self._max_attempts = max_attempts
        self._ready = ReadyCounts(
            f"{topic}/{channel}",
            self.connections,
            max_in_flight,
            everywhere=ready_everywhere,
            backoff=backoff,
            backoff_unit=backoff_unit,
            max_backoff=max_backoff,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconnecting: set[str] = set()
        self._draining: dict[Connection, asyncio.Event] = {}  # connections being retired
        self._started = False
        self._stopping = False
        self._stopped: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        return sum(connection.in_flight for connection in self.connections.values())

    async def start(self) -> None:
        """Connect and subscribe, to every nsqd known by then (nsqlookupd's asked first).

        Raises ``ConnectionError`` when only nsqd addresses were given and
        none answers; nsqd that do not answer are tried again in the background.
        """
        if self._started:
            raise RuntimeError("the consumer is already started")
        self._started = True
        if self._stopping:  # stopped before it started
            return
        watch = self._watch
        if watch is not None:
            await watch.start()
            if self._stopping:
                return
            self._discovered = watch.known
            watch.listen(self._nsqd_listed)
        addresses = [*self._direct, *sorted(self._discovered.difference(self._direct))]
        results = await asyncio.gather(*(self._connect(address) for address in addresses), return_exceptions=True)
        for address, result in zip(addresses, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, ConnectionError):
                    await self.stop()
                    raise result
                logger.warning("%s; retrying", result)
                self._reconnect_later(address)
        if self._direct and not self.connections and watch is None:
            await self.stop()
            raise ConnectionFailed(f"no nsqd reachable for {self.topic}/{self.channel}: {results[0]}")

    def stop(self, timeout: float = 10.0) -> asyncio.Future[None]:
        """Stop gracefully: RDY 0, wait up to ``timeout`` for in-flight messages to be answered, CLS, close.

        RDY 0 is on its way when this returns, ahead of any FIN or REQ sent
        after it: a message requeued then is not handed back to this
        consumer. Await the result for the rest. Messages still unanswered
        after ``timeout`` are redelivered by nsqd after their msg_timeout.
        """
        if self._stopped is None:
            self._stopping = True
            if self._watch is not None:
                self._watch.ignore(self._nsqd_listed)
                if self._own_watch:
                    self._watch.stop()
            self._ready.stop()
            for task in list(self._tasks):
                task.cancel()
            self._stopped = asyncio.ensure_future(self._retire_all(timeout))
        return self._stopped

    async def _retire_all(self, timeout: float) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._retire(connection, timeout) for connection in list(self.connections.values())))

    def publish(self, topic: str, body: bytes, answer: OnAnswer, join: Join | None = None) -> Connection:
        """Publish through a connection this consumer reads from; that connection.

        What its nsqd sends back for it (a reply to an invocation) comes by the
        same connection, so the caller may watch it (``when_closed``). The
        connection is the open one to the first of ``nsqd_tcp_addresses``
        that has one (then any other): the same while it stays open, and the
        first address's again once it is back. ``ConnectionError`` when none is.
        """
        connection = self._publishing
        if connection is None or not connection.is_open:
            connection = self._publishing = min(
                (open_ for open_ in self.connections.values() if open_.is_open),
                key=lambda open_: self._rank(open_.address),
                default=None,
            )
            if connection is None:
                raise ConnectionFailed(f"no connection to nsqd open for {self.topic}/{self.channel}")
        connection.publish(topic, body, answer, join=join)
        return connection

    def _rank(self, address: str) -> int:
        """Where ``address`` comes in the order publishes prefer: the given nsqd in their order, then the rest."""
        return self._direct.index(address) if address in self._direct else len(self._direct)

    def _stop_publishing_through(self, connection: Connection) -> None:
        if self._publishing is connection:
            self._publishing = None

    # --- connections -----------------------------------------------------------

    async def _connect(self, address: str) -> None:
        connection = await Connection.open(
            address,
            self.options,
            on_message=self._deliver,
            on_answered=self._on_answered,
            on_close=self._on_close,
            limits=self.limits,
        )
        try:
            await within(connection.request(encode_sub(self.topic, self.channel)), self.options.connect_timeout)
        except asyncio.TimeoutError:
            connection.abort()
            raise ConnectionFailed(f"nsqd at {address} did not answer SUB in time") from None
        except BaseException:
            connection.abort()
            raise
        if self._stopping or address in self.connections:  # stopped, or connected meanwhile by another way
            await connection.close()
            return
        self.connections[address] = connection
        publishing = self._publishing
        if publishing is not None and self._rank(address) < self._rank(publishing.address):
            self._publishing = None  # the next publish goes by the address preferred, back
        logger.info("consuming %s/%s from %s", self.topic, self.channel, address)
        self._ready.distribute()

    async def _retire(self, connection: Connection, timeout: float) -> None:
        """RDY 0, in-flight messages answered, CLS, close: all within ``timeout``.

        Messages nsqd sent before it had the RDY 0 come before its answer to
        CLS: they are waited for too. Messages still unanswered at the end
        are redelivered by nsqd after their msg_timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection.set_ready(0)
        try:
            await self._drain(connection, deadline)
            await within(connection.request(CLS), max(0.0, deadline - loop.time()))
            await self._drain(connection, deadline)
        except (ConnectionError, asyncio.TimeoutError) as error:
            logger.debug("CLS to %s: %s", connection.address, error)
        finally:
            connection.close_soon()  # cancelled too
        try:
            await within(connection.wait_closed(), timeout)
        except asyncio.TimeoutError:
            connection.abort()  # nsqd does not read what is left
            await connection.wait_closed()

    async def _drain(self, connection: Connection, deadline: float) -> None:
        """Wait until the connection's in-flight messages are answered, or the loop's time is ``deadline``."""
        if not connection.in_flight:
            return
        drained = self._draining[connection] = asyncio.Event()
        try:
            await within(drained.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            logger.warning("closing %s with %d messages unanswered", connection.address, connection.in_flight)
        finally:
            del self._draining[connection]

    def _wanted(self, address: str) -> bool:
        return not self._stopping and (address in self._direct or address in self._discovered)

    def _on_close(self, connection: Connection, error: BaseException | None) -> None:
        if self.connections.get(connection.address) is not connection:
            return
        del self.connections[connection.address]
        self._stop_publishing_through(connection)
        if self._wanted(connection.address):
            logger.warning("lost %s (%s); reconnecting", connection.address, error)
            self._reconnect_later(connection.address, lost=True)
        self._ready.distribute()
        self._check_drained(connection)

    def _reconnect_later(self, address: str, *, lost: bool = False) -> None:
        if address not in self._reconnecting:
            self._reconnecting.add(address)
            self._spawn(self._reconnect(address, lost))

    async def _reconnect(self, address: str, lost: bool) -> None:
        """Exponential backoff with jitter, for as long as the address is wanted; told to the observer if ``lost``."""
        delay = 0.1
        try:
            while self._wanted(address) and address not in self.connections:
                await asyncio.sleep(delay * random.uniform(0.75, 1.25))
                try:
                    await self._connect(address)
                    if lost and observer.current is not None and address in self.connections:
                        observer.current.reconnected(address)
                except (ConnectionError, ProtocolError) as error:
                    # nsqd refusing IDENTIFY, AUTH or SUB (CommandError) may be fixed
                    # on its side: retried as well, and told louder.
                    level = logging.DEBUG if isinstance(error, ConnectionError) else logging.WARNING
                    logger.log(level, "reconnecting to %s: %s", address, error)
                    delay = min(delay * 2, self.options.max_reconnect_interval)
        finally:
            self._reconnecting.discard(address)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- nsqlookupd -------------------------------------------------------------

    def _nsqd_listed(self, listed: frozenset[str]) -> None:
        """The watch lists ``listed`` now: subscribe on the nsqd new to it.

        A connection to an nsqd no longer listed is kept while it is open, as
        NSQ's own clients keep it: a restarted nsqlookupd lists no nsqd until
        each registers again (within nsqd's 15 s ping), an nsqd that dies
        closes it, and one drained of a topic deletes the topic, which closes
        it too. Only an nsqd that is listed is connected to again.
        """
        self._discovered = listed
        for address in listed:
            if address not in self.connections:
                self._reconnect_later(address)

    def _on_answered(self, connection: Connection, requeued: bool, backoff: bool) -> None:
        self._ready.answered(requeued, backoff)
        self._check_drained(connection)

    def _check_drained(self, connection: Connection) -> None:
        drained = self._draining.get(connection)
        if drained is not None and (not connection.in_flight or not connection.is_open):
            drained.set()

    # --- delivery ---------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        if self._max_attempts and message.attempts > self._max_attempts:
            self._give_up(message)
            return
        try:
            self._on_message(message)
        except Exception:
            logger.exception("%s/%s: the message handler raised; requeuing %r", self.topic, self.channel, message.id)
            if not message.answered:
                message.req(self._requeue_delay * message.attempts, backoff=True)

    def _give_up(self, message: Message) -> None:
        if self._on_give_up is None:
            logger.warning(
                "%s/%s: giving up on %r after %d attempts", self.topic, self.channel, message, message.attempts
            )
        else:
            try:
                self._on_give_up(message)
            except Exception:
                logger.exception("%s/%s: on_give_up raised", self.topic, self.channel)
        if not message.answered:
            message.fin()
