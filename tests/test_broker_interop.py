"""Independent NSQ clients through the broker: ansq (asyncio) and pynsq (tornado).

Each test runs once per client library, through a small adapter that gives
both the same shape: ``producer()`` publishes with PUB, MPUB and DPUB and
waits for the broker's OK; ``consumer()`` subscribes and puts every message
it receives into an ``asyncio.Queue`` as a ``Received``, to FIN or REQ from
the test. pynsq runs on tornado's IOLoop, which inside a pytest-asyncio test
is the running asyncio loop, so both libraries share the test's loop.

Only what nsqd does is checked, so the tests hold on nsqd as on the embedded
broker, except the lookupd one: nsqd serves no ``/lookup``.

pynsq logs ``ERROR: IntegrityError('failed to unpack size')`` whenever one of
its connections closes, even when pynsq itself closed it: that is no failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ansq
import nsq
import pytest

from almanet.pytest_plugin import BrokerAddresses
from helpers import eventually

# Long enough for a loaded CI machine; waits that succeed return at once.
TIMEOUT = 5.0
# How late a deferred or timed-out message may come back: brokers find them in
# a scan every 100 ms of a list of channels refreshed every 5 s (nsqd's queue scan).
QUEUE_SCAN_LATENESS = 5.1
# nsqd's smallest msg_timeout (its IDENTIFY refuses less).
MIN_MSG_TIMEOUT_MS = 1000
# Delays of the DPUB and REQ tests: each takes about this long.
DELAY_MS = 500


# --- broker state over nsqd's HTTP API -----------------------------------------


def topic_stats(http_address: str, topic: str) -> dict[str, Any] | None:
    """The topic's entry of ``/stats?format=json``, or None while it does not exist."""
    query = urllib.parse.urlencode({"format": "json", "topic": topic})
    with urllib.request.urlopen(f"http://{http_address}/stats?{query}", timeout=TIMEOUT) as response:
        report = json.load(response)
    return next((entry for entry in report["topics"] or [] if entry["topic_name"] == topic), None)


def channel_clients(http_address: str, topic: str, channel: str) -> int | None:
    """How many clients are subscribed to the channel, or None if it does not exist."""
    stats = topic_stats(http_address, topic)
    for entry in stats["channels"] if stats else []:
        if entry["channel_name"] == channel:
            return int(entry["client_count"])
    return None


# --- the same shape for both libraries -----------------------------------------


@dataclasses.dataclass
class Received:
    """A delivered message, whichever library delivered it; ``fin``/``req`` answer the broker."""

    consumer: str
    id: bytes
    body: bytes
    attempts: int
    timestamp: int  # nanoseconds since the epoch, set by the broker
    arrived: float  # time.monotonic() when the library handed it over
    fin: Callable[[], Awaitable[None]]
    req: Callable[[int], Awaitable[None]]  # delay in milliseconds


class Consumer:
    def __init__(self, inbox: asyncio.Queue[Received]) -> None:
        self.inbox = inbox

    async def next(self, timeout: float = TIMEOUT) -> Received:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def nothing(self, timeout: float = 0.2) -> None:
        """Assert that no message arrives within ``timeout``."""
        with contextlib.suppress(asyncio.TimeoutError):
            message = await self.next(timeout)
            raise AssertionError(f"unexpected {message}")

    async def take(self, count: int, timeout: float = TIMEOUT) -> list[Received]:
        """The next ``count`` messages, each FINed as it arrives."""
        messages = []
        for _ in range(count):
            message = await self.next(timeout)
            await message.fin()
            messages.append(message)
        return messages


class Producer:
    async def pub(self, topic: str, body: bytes) -> None:
        raise NotImplementedError

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        raise NotImplementedError

    async def dpub(self, topic: str, body: bytes, defer_ms: int) -> None:
        raise NotImplementedError


class Library:
    """One client library: ``producer()`` and ``consumer()`` context managers on the broker."""

    name = ""

    def __init__(self, broker: BrokerAddresses) -> None:
        self.broker = broker

    def producer(self) -> contextlib.AbstractAsyncContextManager[Producer]:
        raise NotImplementedError

    def consumer(
        self,
        topic: str,
        channel: str,
        *,
        inbox: asyncio.Queue[Received] | None = None,
        name: str = "",
        msg_timeout_ms: int | None = None,
        lookupd: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[Consumer]:
        """Subscribed once entered (the broker has the channel); ``lookupd`` finds the broker via ``/lookup``."""
        raise NotImplementedError


class AnsqProducer(Producer):
    def __init__(self, writer: ansq.tcp.writer.Writer) -> None:
        self.writer = writer

    @staticmethod
    async def _ok(command: Awaitable[Any]) -> None:
        # ansq waits for the answer without a timeout of its own.
        response = await asyncio.wait_for(command, TIMEOUT)
        assert response.is_ok, response  # an error frame comes back as the result, not raised

    async def pub(self, topic: str, body: bytes) -> None:
        await self._ok(self.writer.pub(topic, body))

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        # ansq sends a single message as a malformed MPUB body: publish two at least.
        assert len(bodies) > 1
        await self._ok(self.writer.mpub(topic, *bodies))

    async def dpub(self, topic: str, body: bytes, defer_ms: int) -> None:
        await self._ok(self.writer.dpub(topic, body, defer_ms))


class Ansq(Library):
    name = "ansq"

    @staticmethod
    def _options(msg_timeout_ms: int | None = None) -> ansq.ConnectionOptions:
        # No auto-reconnect: a connection the broker closes must fail the test, not come back.
        features = (
            ansq.ConnectionFeatures() if msg_timeout_ms is None else ansq.ConnectionFeatures(msg_timeout=msg_timeout_ms)
        )
        return ansq.ConnectionOptions(auto_reconnect=False, features=features)

    @contextlib.asynccontextmanager
    async def producer(self) -> AsyncIterator[Producer]:
        writer = await asyncio.wait_for(ansq.create_writer([self.broker.tcp_address], self._options()), TIMEOUT)
        try:
            yield AnsqProducer(writer)
        finally:
            await writer.close()

    @contextlib.asynccontextmanager
    async def consumer(
        self,
        topic: str,
        channel: str,
        *,
        inbox: asyncio.Queue[Received] | None = None,
        name: str = "",
        msg_timeout_ms: int | None = None,
        lookupd: bool = False,
    ) -> AsyncIterator[Consumer]:
        inbox = asyncio.Queue() if inbox is None else inbox
        addresses: dict[str, list[str]] = (
            {"lookupd_http_addresses": [self.broker.http_address]}
            if lookupd
            else {"nsqd_tcp_addresses": [self.broker.tcp_address]}
        )
        # create_reader returns once SUB was answered and RDY 1 sent.
        reader = await asyncio.wait_for(
            ansq.create_reader(topic, channel, connection_options=self._options(msg_timeout_ms), **addresses), TIMEOUT
        )

        async def pump() -> None:
            while (message := await reader.wait_for_message()) is not None:
                inbox.put_nowait(
                    Received(
                        name,
                        message.id.encode(),
                        message.body,
                        message.attempts,
                        message.timestamp,
                        time.monotonic(),
                        message.fin,
                        message.req,
                    )
                )

        pumping = asyncio.create_task(pump())
        try:
            assert reader.connections, "ansq connected to no broker"
            yield Consumer(inbox)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
            await reader.close()


class PynsqProducer(Producer):
    def __init__(self, writer: nsq.Writer) -> None:
        self.writer = writer

    async def _publish(self, method: Callable[..., Any], *args: Any) -> None:
        answered = asyncio.get_running_loop().create_future()
        method(*args, callback=lambda conn, data: answered.set_result(data))
        data = await asyncio.wait_for(answered, TIMEOUT)
        assert data == b"OK", data

    async def pub(self, topic: str, body: bytes) -> None:
        await self._publish(self.writer.pub, topic, body)

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        await self._publish(self.writer.mpub, topic, bodies)

    async def dpub(self, topic: str, body: bytes, defer_ms: int) -> None:
        await self._publish(self.writer.dpub, topic, defer_ms, body)


class Pynsq(Library):
    name = "pynsq"

    @contextlib.asynccontextmanager
    async def producer(self) -> AsyncIterator[Producer]:
        writer = nsq.Writer([self.broker.tcp_address])
        try:
            await eventually(lambda: writer.conns)  # connected and IDENTIFY answered
            yield PynsqProducer(writer)
        finally:
            # Writer has no close(); closing a connection schedules a reconnect
            # in 15 s, which never runs: the test's loop is closed before.
            for conn in list(writer.conns.values()):
                conn.close()
            await eventually(lambda: not writer.conns)

    @contextlib.asynccontextmanager
    async def consumer(
        self,
        topic: str,
        channel: str,
        *,
        inbox: asyncio.Queue[Received] | None = None,
        name: str = "",
        msg_timeout_ms: int | None = None,
        lookupd: bool = False,
    ) -> AsyncIterator[Consumer]:
        target: asyncio.Queue[Received] = asyncio.Queue() if inbox is None else inbox

        def handle(message: nsq.Message) -> None:
            message.enable_async()  # the test answers, not the return value

            async def fin() -> None:
                message.finish()

            async def req(delay_ms: int) -> None:
                # backoff=False: a REQ would otherwise also pause the reader (RDY 0) for a while.
                message.requeue(time_ms=delay_ms, backoff=False)

            target.put_nowait(
                Received(
                    name, message.id, message.body, message.attempts, message.timestamp, time.monotonic(), fin, req
                )
            )

        settings: dict[str, Any] = (
            # pynsq queries lookupd at once, then every lookupd_poll_interval seconds.
            {"lookupd_http_addresses": [self.broker.http_address], "lookupd_poll_jitter": 0.0}
            if lookupd
            else {"nsqd_tcp_addresses": [self.broker.tcp_address]}
        )
        if msg_timeout_ms is not None:
            settings["msg_timeout"] = msg_timeout_ms / 1000  # pynsq takes seconds
        http = self.broker.http_address
        subscribed = (channel_clients(http, topic, channel) or 0) + 1
        reader = nsq.Reader(topic, channel, message_handler=handle, max_in_flight=1, **settings)
        try:
            # pynsq tells nothing when SUB is answered: wait for the broker to count the client.
            await eventually(lambda: (channel_clients(http, topic, channel) or 0) >= subscribed)
            yield Consumer(target)
        finally:
            reader.close()
            await eventually(lambda: not reader.conns)
            # Reader.close() leaves the HTTP client for lookupd queries open: tornado
            # shares one per loop, to close with the loop (closing twice is harmless).
            reader.http_client.close()


LIBRARIES = {"ansq": Ansq, "pynsq": Pynsq}


@pytest.fixture(params=list(LIBRARIES))
def library(request: pytest.FixtureRequest, almanet_broker: BrokerAddresses) -> Library:
    return LIBRARIES[request.param](almanet_broker)


def assert_fresh(message: Received) -> None:
    """First delivery, with an nsqd-shaped id and a nanosecond timestamp of about now."""
    assert message.attempts == 1
    assert len(message.id) == 16
    assert abs(message.timestamp / 1e9 - time.time()) < 60


# --- tests ---------------------------------------------------------------------


async def test_pub_and_mpub_bodies_arrive_intact(library: Library, topic: str) -> None:
    """PUB and MPUB bodies (binary, newlines, 64 KiB past ansq's 4 KiB reads) arrive byte for byte, once each."""
    single = [b"hello", bytes(range(256)) * 3, b"line one\nline two\n", os.urandom(64 * 1024)]
    batch = [b"batch %d" % i for i in range(5)] + [b"\x00" * 10, "h\u00e9llo w\u00f6rld".encode()]
    async with library.producer() as producer, library.consumer(topic, "ch") as consumer:
        for body in single:
            await producer.pub(topic, body)
        await producer.mpub(topic, batch)
        received = await consumer.take(len(single) + len(batch))
        await consumer.nothing()
    assert sorted(message.body for message in received) == sorted(single + batch)
    assert len({message.id for message in received}) == len(received)
    for message in received:
        assert_fresh(message)


async def test_dpub_is_delivered_after_its_defer(library: Library, topic: str) -> None:
    """A DPUB message comes no sooner than its defer, overtaken by a PUB sent after it."""
    async with library.producer() as producer, library.consumer(topic, "ch") as consumer:
        sent = time.monotonic()
        await producer.dpub(topic, b"deferred", DELAY_MS)
        await producer.pub(topic, b"immediate")
        first = await consumer.next()
        await first.fin()
        deferred = await consumer.next(DELAY_MS / 1000 + QUEUE_SCAN_LATENESS + TIMEOUT)
        await deferred.fin()
    assert first.body == b"immediate"
    assert deferred.body == b"deferred"
    assert deferred.arrived - sent >= DELAY_MS / 1000
    assert_fresh(deferred)


async def test_fan_out_every_channel_gets_every_message(library: Library, topic: str) -> None:
    """Two channels of one topic each get every message, with the same ids."""
    bodies = [b"message %d" % i for i in range(10)]
    async with (
        library.producer() as producer,
        library.consumer(topic, "one") as one,
        library.consumer(topic, "two") as two,
    ):
        await producer.mpub(topic, bodies)
        got_one = await one.take(len(bodies))
        got_two = await two.take(len(bodies))
        await one.nothing(0.1)
        await two.nothing(0.1)
    assert sorted(message.body for message in got_one) == bodies
    assert {message.id: message.body for message in got_one} == {message.id: message.body for message in got_two}


async def test_load_balancing_consumers_of_one_channel_share_messages(library: Library, topic: str) -> None:
    """Two consumers of one channel (RDY 1 each) share the messages: each some, together all, none twice."""
    bodies = [b"job %d" % i for i in range(10)]
    inbox: asyncio.Queue[Received] = asyncio.Queue()
    async with (
        library.producer() as producer,
        library.consumer(topic, "workers", inbox=inbox, name="a") as workers,  # one inbox for both
        library.consumer(topic, "workers", inbox=inbox, name="b"),
    ):
        await producer.mpub(topic, bodies)
        # Neither FINs its first message yet: holding one with RDY 1, a
        # consumer gets nothing more, so the broker must serve the other.
        held = [await workers.next(), await workers.next()]
        assert {message.consumer for message in held} == {"a", "b"}
        for message in held:
            await message.fin()
        received = held + await workers.take(len(bodies) - 2)
        await workers.nothing()
    assert sorted(message.body for message in received) == bodies
    assert len({message.id for message in received}) == len(bodies)


async def test_req_redelivers_with_attempts_counted(library: Library, topic: str) -> None:
    """A message REQed without delay comes back at once, same id and body, attempts 2 then 3."""
    async with library.producer() as producer, library.consumer(topic, "ch") as consumer:
        await producer.pub(topic, b"try again")
        deliveries = [await consumer.next()]
        for _ in range(2):
            await deliveries[-1].req(0)
            deliveries.append(await consumer.next())
        await deliveries[-1].fin()
        await consumer.nothing()
    assert [message.attempts for message in deliveries] == [1, 2, 3]
    assert {(message.id, message.body) for message in deliveries} == {(deliveries[0].id, b"try again")}


async def test_req_with_delay_waits_that_long(library: Library, topic: str) -> None:
    """A message REQed with a delay comes back no sooner than the delay, with attempts 2."""
    async with library.producer() as producer, library.consumer(topic, "ch") as consumer:
        await producer.pub(topic, b"later please")
        first = await consumer.next()
        requeued = time.monotonic()
        await first.req(DELAY_MS)
        again = await consumer.next(DELAY_MS / 1000 + QUEUE_SCAN_LATENESS + TIMEOUT)
        await again.fin()
    assert again.arrived - requeued >= DELAY_MS / 1000
    assert (again.id, again.body, again.attempts) == (first.id, b"later please", 2)


async def test_msg_timeout_redelivers_what_is_never_finished(library: Library, topic: str) -> None:
    """With IDENTIFY msg_timeout 1000 ms, a message left unanswered comes back after it, attempts 2."""
    async with (
        library.producer() as producer,
        library.consumer(topic, "ch", msg_timeout_ms=MIN_MSG_TIMEOUT_MS) as consumer,
    ):
        await producer.pub(topic, b"too slow")
        first = await consumer.next()  # never answered
        again = await consumer.next(MIN_MSG_TIMEOUT_MS / 1000 + QUEUE_SCAN_LATENESS + TIMEOUT)
        await again.fin()
        await consumer.nothing()
    # Less a little: the first delivery reached the library a moment after the broker started its clock.
    assert again.arrived - first.arrived >= MIN_MSG_TIMEOUT_MS / 1000 - 0.05
    assert (again.id, again.body, again.attempts) == (first.id, b"too slow", 2)


async def test_message_of_a_departed_consumer_comes_back_after_its_msg_timeout(library: Library, topic: str) -> None:
    """A consumer leaving without FIN keeps its message until its msg_timeout (as in nsqd); then another gets it."""
    async with library.producer() as producer:
        async with library.consumer(topic, "ch", msg_timeout_ms=MIN_MSG_TIMEOUT_MS) as leaves:
            await producer.pub(topic, b"orphan")
            first = await leaves.next()  # never answered
        async with library.consumer(topic, "ch") as other:
            again = await other.next(MIN_MSG_TIMEOUT_MS / 1000 + QUEUE_SCAN_LATENESS + TIMEOUT)
            await again.fin()
    assert again.arrived - first.arrived >= MIN_MSG_TIMEOUT_MS / 1000 - 0.05
    assert (again.id, again.body, again.attempts) == (first.id, b"orphan", 2)


async def test_ephemeral_channel_goes_with_its_last_consumer(
    library: Library, topic: str, almanet_broker: BrokerAddresses
) -> None:
    """An ``#ephemeral`` channel stays while it has a consumer and leaves /stats with the last one."""
    http = almanet_broker.http_address
    channel = "watch#ephemeral"
    async with library.consumer(topic, channel):
        async with library.consumer(topic, channel):
            assert channel_clients(http, topic, channel) == 2
        await eventually(lambda: channel_clients(http, topic, channel) == 1)
    await eventually(lambda: channel_clients(http, topic, channel) is None)
    assert topic_stats(http, topic) is not None  # the topic is not ephemeral: it stays


async def test_ephemeral_topic_goes_with_its_last_channel(
    library: Library, topic: str, almanet_broker: BrokerAddresses
) -> None:
    """An ``#ephemeral`` topic leaves /stats when its last (ephemeral) channel goes."""
    http = almanet_broker.http_address
    ephemeral_topic = f"{topic}#ephemeral"
    async with library.producer() as producer, library.consumer(ephemeral_topic, "watch#ephemeral") as consumer:
        await producer.pub(ephemeral_topic, b"fleeting")
        message = await consumer.next()
        await message.fin()
        assert topic_stats(http, ephemeral_topic) is not None
    await eventually(lambda: topic_stats(http, ephemeral_topic) is None)
    assert message.body == b"fleeting"


async def test_lookupd_finds_the_broker(library: Library, topic: str, embedded: BrokerAddresses) -> None:
    """A reader given the broker's HTTP address as lookupd finds it via /lookup?topic= and consumes.

    Embedded only: nsqd itself serves no /lookup (nsqlookupd does).
    """
    async with library.producer() as producer:
        await producer.pub(topic, b"found you")  # /lookup knows only topics that exist
    async with library.consumer(topic, "ch", lookupd=True) as consumer:
        message = await consumer.next()
        await message.fin()
    assert message.body == b"found you"
    assert_fresh(message)


@pytest.mark.parametrize(("publisher", "subscriber"), [("ansq", "pynsq"), ("pynsq", "ansq")])
async def test_one_library_publishes_the_other_consumes(
    publisher: str, subscriber: str, topic: str, almanet_broker: BrokerAddresses
) -> None:
    """What one library publishes with PUB, MPUB and DPUB, the other consumes intact."""
    bodies = [b"single", b"multi 1", b"multi 2", b"deferred"]
    async with (
        LIBRARIES[publisher](almanet_broker).producer() as producer,
        LIBRARIES[subscriber](almanet_broker).consumer(topic, "ch") as consumer,
    ):
        await producer.pub(topic, bodies[0])
        await producer.mpub(topic, bodies[1:3])
        await producer.dpub(topic, bodies[3], 50)
        received = await consumer.take(len(bodies), QUEUE_SCAN_LATENESS + TIMEOUT)
    assert sorted(message.body for message in received) == sorted(bodies)
    for message in received:
        assert_fresh(message)


async def test_stats_show_what_the_library_identified_as(
    library: Library, topic: str, almanet_broker: BrokerAddresses
) -> None:
    """/stats lists the consumer with the user_agent and hostname its IDENTIFY sent."""
    http = almanet_broker.http_address

    def clients() -> list[dict[str, Any]]:
        stats = topic_stats(http, topic)
        return stats["channels"][0]["clients"] if stats else []

    async with library.consumer(topic, "ch"):
        await eventually(lambda: [client["ready_count"] for client in clients()] == [1])  # RDY follows SUB
        (client,) = clients()
    assert client["user_agent"].startswith(f"{library.name}/")
    assert client["hostname"]
