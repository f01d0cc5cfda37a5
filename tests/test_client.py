"""almanet's NSQ client (``almanet.nsq``) against a broker: Producer, Consumer and their connections.

Tests of plain nsqd behaviour use the shared broker of the ``almanet_broker``
fixture (the embedded one, or a real nsqd when ALMANET_TEST_NSQD is set) with
a topic of their own. Tests that need broker settings, several brokers, a
restart or nsqlookupd's ``/lookup`` start embedded brokers of their own, in
the test's event loop. What the broker sees (RDY, in-flight and queued
messages) is read from ``/stats``. Timing tests use nsqd's smallest settings
(1 s msg_timeout and heartbeat interval) and short delays, and wait for
events rather than sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import ansq
import pytest
from fakensqd import FakeLookupd

import almanet.nsq.ready
from almanet.broker import Broker
from almanet.nsq import CommandError, ConnectionOptions, Consumer, Message, MessageTooBig, Producer
from almanet.pytest_plugin import BrokerAddresses
from helpers import channel_stats, eventually

pytestmark = pytest.mark.asyncio

# Long enough for a loaded CI machine, and for nsqd, which finds deferred and
# timed-out messages in a scan whose list of channels it refreshes every 5 s:
# a new channel's are found up to 5 s late. Waits that succeed return at once.
TIMEOUT = 15.0
CHANNEL = "ch"
# The delays of DPUB, REQ and backoff tests: each takes about this long.
DELAY = 0.3

T = TypeVar("T")


# --- brokers -------------------------------------------------------------------


def own_broker(tcp_address: str = "127.0.0.1:0", **settings: Any) -> Broker:
    """An embedded broker of the test's own on loopback (free ports unless told)."""
    return Broker(tcp_address=tcp_address, http_address="127.0.0.1:0", broadcast_address="127.0.0.1", **settings)


def unused_address() -> str:
    """A loopback ``host:port`` nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def ready_counts(http_address: str, topic: str) -> list[int]:
    """The RDY count of each subscriber of the channel, as the broker has it."""
    stats = await channel_stats(http_address, topic)
    return sorted(client["ready_count"] for client in stats["clients"]) if stats else []


async def until(probe: Callable[[], Awaitable[T]], expected: T, timeout: float = TIMEOUT) -> None:
    """Wait until ``await probe()`` gives ``expected``."""
    deadline = time.monotonic() + timeout
    while (value := await probe()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r}, not {expected!r}, after {timeout} s")
        await asyncio.sleep(0.01)


# --- consuming ------------------------------------------------------------------


class Inbox:
    """A consumer's ``on_message`` that queues each message with its arrival time, for the test to answer."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Message, float]] = asyncio.Queue()

    def __call__(self, message: Message) -> None:
        self._queue.put_nowait((message, time.monotonic()))

    async def next_timed(self, timeout: float = TIMEOUT) -> tuple[Message, float]:
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def next(self, timeout: float = TIMEOUT) -> Message:
        return (await self.next_timed(timeout))[0]

    async def nothing(self, timeout: float = 0.2) -> None:
        """Assert that no message arrives within ``timeout``."""
        with contextlib.suppress(asyncio.TimeoutError):
            message = await self.next(timeout)
            raise AssertionError(f"unexpected {message}")

    async def take(self, count: int) -> list[bytes]:
        """The bodies of the next ``count`` messages, each FINed as it arrives."""
        bodies = []
        for _ in range(count):
            message = await self.next()
            message.fin()
            bodies.append(message.body)
        return bodies


def consumer(address: str, topic: str, on_message: Callable[[Message], None], **settings: Any) -> Consumer:
    """A consumer of ``topic`` through ``ch`` from one nsqd; subscribed once entered."""
    return Consumer(topic, CHANNEL, on_message, nsqd_tcp_addresses=[address], **settings)


# --- publishing ------------------------------------------------------------------


async def test_pipelined_publishes_are_delivered_in_publish_order(almanet_broker: BrokerAddresses, topic: str) -> None:
    """Hundreds of publishes in flight on one connection each get their OK, and arrive in order."""
    tcp = almanet_broker.tcp_address
    bodies = [b"message %d" % number for number in range(500)]
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, max_in_flight=100):
        await asyncio.wait_for(asyncio.gather(*(producer.publish(topic, body) for body in bodies)), TIMEOUT)
        assert await inbox.take(len(bodies)) == bodies


async def test_publishes_of_one_loop_iteration_go_out_in_one_write(almanet_broker: BrokerAddresses, topic: str) -> None:
    """Publishes to a topic in one loop iteration become one MPUB; all commands of the iteration, one write."""
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, max_in_flight=200):
        connection = await producer.connect()
        transport = connection._transport
        assert transport is not None
        writes: list[bytes] = []
        write = transport.write

        def counting_write(data: bytes) -> None:
            writes.append(data)
            write(data)

        transport.write = counting_write  # type: ignore[method-assign]
        publishes = [producer.publish(topic, b"%d" % n) for n in range(100)]
        publishes.append(producer.publish(topic, b"deferred", delay=0.01))
        publishes.append(producer.publish(f"{topic}.other", b"alone"))
        publishes.append(producer.publish_batch(topic, [b"explicit", b"batch"]))
        publishes.append(producer.publish(topic, b"100"))  # after the explicit batch, not in the first MPUB
        assert await asyncio.wait_for(asyncio.gather(*publishes), TIMEOUT) == [b"OK"] * 104
        in_order = [b"%d" % n for n in range(100)] + [b"explicit", b"batch", b"100", b"deferred"]
        assert await inbox.take(104) == in_order
    assert len(writes) == 1
    commands = writes[0]
    assert commands.startswith(f"MPUB {topic}\n".encode())
    assert commands.count(b"MPUB ") == 2
    assert commands.count(b"DPUB ") == 1
    assert commands.count(b"PUB ") == 5  # the two MPUBs, the DPUB and two PUBs


async def test_coalesced_publishes_split_at_max_body_size(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    bodies = [b"%03d" % n + b"x" * 97 for n in range(25)]
    async with (
        Producer(tcp, options=ConnectionOptions(max_body_size=4 + 10 * 104)) as producer,
        consumer(tcp, topic, inbox, max_in_flight=25),
    ):
        connection = await producer.connect()
        sent: list[bytes] = []
        send_request = connection.send_request
        connection.send_request = lambda command, answer: (sent.append(command), send_request(command, answer))[1]  # type: ignore[method-assign]
        await asyncio.wait_for(asyncio.gather(*(producer.publish(topic, body) for body in bodies)), TIMEOUT)
        assert await inbox.take(25) == bodies
    assert [command.split(b"\n", 1)[0].split(b" ")[0] for command in sent] == [b"MPUB", b"MPUB", b"MPUB"]


async def test_a_publisher_that_stops_waiting_does_not_cancel_the_others(
    almanet_broker: BrokerAddresses, topic: str
) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, max_in_flight=3):
        await producer.connect()
        kept = producer.publish(topic, b"kept")
        abandoned = asyncio.ensure_future(producer.publish(topic, b"abandoned"))
        also_kept = producer.publish(topic, b"also kept")
        await asyncio.sleep(0)
        abandoned.cancel()
        assert await asyncio.wait_for(asyncio.gather(kept, also_kept), TIMEOUT) == [b"OK", b"OK"]
        # Cancelling the wait does not take the message back: it was published with the others.
        assert sorted(await inbox.take(3)) == [b"abandoned", b"also kept", b"kept"]


async def test_publish_batch_delivers_every_message_in_order(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    bodies = [b"batch %d" % number for number in range(200)]
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, max_in_flight=200):
        await producer.publish_batch(topic, bodies[:1])
        await producer.publish_batch(topic, bodies[1:])
        assert await inbox.take(len(bodies)) == bodies


async def test_deferred_publish_arrives_no_sooner_than_its_delay(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, max_in_flight=2):
        published = time.monotonic()
        await producer.publish(topic, b"later", delay=DELAY)
        await producer.publish(topic, b"now")
        now = await inbox.next()
        now.fin()
        later, later_at = await inbox.next_timed()
        later.fin()
    assert (now.body, later.body) == (b"now", b"later")
    assert later_at - published >= DELAY


async def test_close_waits_for_the_publishes_in_flight(almanet_broker: BrokerAddresses, topic: str) -> None:
    producer = Producer(almanet_broker.tcp_address)
    await producer.connect()
    publishes = [asyncio.ensure_future(producer.publish(topic, b"%d" % number)) for number in range(100)]
    await asyncio.sleep(0)  # the publishes are under way, none answered yet
    await asyncio.wait_for(producer.close(), TIMEOUT)
    assert await asyncio.gather(*publishes) == [b"OK"] * 100
    with pytest.raises(ConnectionError, match="closed"):
        await producer.publish(topic, b"too late")


async def test_producer_fails_over_to_the_next_address(topic: str) -> None:
    async with own_broker() as first, own_broker() as second:
        inbox = Inbox()
        addresses = [first.tcp_address, second.tcp_address]
        async with (
            Producer(unused_address(), *addresses) as producer,
            Consumer(topic, CHANNEL, inbox, nsqd_tcp_addresses=addresses, max_in_flight=2),
        ):
            connection = await producer.connect()
            assert connection.address == first.tcp_address  # past the dead one
            await producer.publish(topic, b"to the first")
            assert (await inbox.take(1)) == [b"to the first"]

            await first.stop()
            await asyncio.wait_for(connection.wait_closed(), TIMEOUT)
            await producer.publish(topic, b"to the second")
            assert (await producer.connect()).address == second.tcp_address
            assert (await inbox.take(1)) == [b"to the second"]


# --- refused before sending, refused by the broker ------------------------------------


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "slash/name", "naïve", "#ephemeral", "a#eph"])
async def test_invalid_names_are_refused_before_anything_is_sent(name: str) -> None:
    """A ValueError although nothing listens at the address: nothing was sent, no connection tried."""
    producer = Producer(unused_address())
    with pytest.raises(ValueError, match="topic"):
        await producer.publish(name, b"body")
    with pytest.raises(ValueError, match="topic"):
        await producer.publish(name, b"body", delay=1.0)
    with pytest.raises(ValueError, match="topic"):
        await producer.publish_batch(name, [b"body"])
    with pytest.raises(ValueError, match="topic"):
        Consumer(name, CHANNEL, Inbox(), nsqd_tcp_addresses=[unused_address()])
    with pytest.raises(ValueError, match="channel"):
        Consumer("topic", name, Inbox(), nsqd_tcp_addresses=[unused_address()])
    await producer.close()


async def test_bad_bodies_are_refused_and_the_connection_goes_on(almanet_broker: BrokerAddresses, topic: str) -> None:
    """Empty and oversized bodies give a ValueError; had they been sent, nsqd would have closed the connection."""
    async with Producer(
        almanet_broker.tcp_address, options=ConnectionOptions(max_msg_size=100, max_body_size=250)
    ) as producer:
        connection = await producer.connect()
        with pytest.raises(ValueError, match="empty"):
            await producer.publish(topic, b"")
        with pytest.raises(ValueError, match="empty"):
            await producer.publish(topic, b"", delay=1.0)
        with pytest.raises(ValueError, match="empty"):
            await producer.publish_batch(topic, [b"fine", b""])
        with pytest.raises(ValueError, match="at least one"):
            await producer.publish_batch(topic, [])
        with pytest.raises(ValueError, match="max_msg_size"):
            await producer.publish(topic, b"x" * 101)
        with pytest.raises(ValueError, match="max_msg_size"):
            await producer.publish_batch(topic, [b"fine", b"x" * 101])
        with pytest.raises(ValueError, match="max_body_size"):
            await producer.publish_batch(topic, [b"x" * 100] * 3)
        await producer.publish(topic, b"x" * 100)
        await producer.publish_batch(topic, [b"x" * 100] * 2)
        assert await producer.connect() is connection
    with pytest.raises(ValueError, match="max_msg_size"):
        await Producer(unused_address()).publish(topic, b"x" * (1024 * 1024 + 1))


async def test_a_big_or_deferred_publish_keeps_its_place_among_the_others(
    almanet_broker: BrokerAddresses, topic: str
) -> None:
    """Sent apart from the MPUB of the others, it still leaves after what was published before it."""
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    big = b"x" * 20_000
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, max_in_flight=10):
        await asyncio.gather(producer.publish(topic, b"1"), producer.publish(topic, big), producer.publish(topic, b"2"))
        received = []
        for _ in range(3):
            message = await inbox.next()
            message.fin()
            received.append(message.body)
    assert received == [b"1", big, b"2"]


async def test_refused_publishes_raise_command_error_and_the_next_publish_reconnects(topic: str) -> None:
    """nsqd refuses an MPUB whole, with an error frame, and closes: every publish coalesced into it fails."""
    async with own_broker(mem_queue_size=3, max_msg_size=100) as broker, Producer(broker.tcp_address) as producer:
        first = await producer.connect()
        assert await producer.publish(topic, b"0") == b"OK"
        assert await producer.publish(topic, b"1") == b"OK"
        results = await asyncio.gather(
            *(producer.publish(topic, b"%d" % number) for number in range(2, 5)), return_exceptions=True
        )
        assert all(isinstance(result, CommandError) and result.code == "E_MPUB_FAILED" for result in results)
        assert await producer.connect() is not first  # the next publish reconnects
        stats = await channel_stats(broker.http_address, topic)
        assert stats is None  # no channel: the two published messages wait in the topic, none of the three joined

        await producer.publish(f"{topic}.other", b"room here")
        second = await producer.connect()
        with pytest.raises(MessageTooBig, match="refused") as too_big:
            await producer.publish(f"{topic}.other", b"x" * 101)  # the broker's limit, not the producer's
        assert (too_big.value.size, too_big.value.limit) == (101, 100)
        assert isinstance(too_big.value.__cause__, CommandError)
        assert too_big.value.__cause__.code == "E_BAD_MESSAGE"
        await producer.publish(f"{topic}.other", b"fits")
        assert await producer.connect() is not second
        with pytest.raises(MessageTooBig, match="not sent"):  # the limit is known now
            producer.publish(f"{topic}.other", b"x" * 101)


# --- consuming: answers, redelivery, attempts ------------------------------------------


async def test_unanswered_message_comes_back_after_msg_timeout(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    async with Producer(tcp) as producer:
        receiver = consumer(tcp, topic, inbox, options=ConnectionOptions(msg_timeout=1.0))
        await receiver.start()
        published = time.monotonic()
        await producer.publish(topic, b"forgotten")
        first = await inbox.next()
        second, second_at = await inbox.next_timed(TIMEOUT + 1.0)
        second.fin()
        # The first delivery, timed out at the broker, still counts as in flight here.
        await receiver.stop(timeout=0.1)
    assert (second.id, second.body, second.attempts) == (first.id, b"forgotten", 2)
    assert first.attempts == 1
    assert second_at - published >= 1.0


async def test_req_redelivers_after_its_delay(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox):
        await producer.publish(topic, b"again")
        first = await inbox.next()
        first.req(0)
        second = await inbox.next()
        requeued = time.monotonic()
        second.req(DELAY)
        third, third_at = await inbox.next_timed()
        third.fin()
        with pytest.raises(RuntimeError, match="already answered"):
            third.req()
    assert [message.attempts for message in (first, second, third)] == [1, 2, 3]
    assert {message.id for message in (first, second, third)} == {first.id}
    assert third_at - requeued >= DELAY


async def test_touch_holds_a_message_past_its_msg_timeout(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp, http = almanet_broker.tcp_address, almanet_broker.http_address
    inbox = Inbox()
    async with Producer(tcp) as producer, consumer(tcp, topic, inbox, options=ConnectionOptions(msg_timeout=1.0)):
        await producer.publish(topic, b"slow work")
        message = await inbox.next()
        for _ in range(3):
            await inbox.nothing(0.4)  # holding the message: 1.2 s in all, past its 1 s msg_timeout
            message.touch()
        message.fin()
        with pytest.raises(RuntimeError, match="already answered"):
            message.touch()
        await until(lambda: in_flight_and_queued(http, topic), (0, 0))
    stats = await channel_stats(http, topic)
    assert stats is not None
    assert stats["timeout_count"] == 0


async def in_flight_and_queued(http_address: str, topic: str) -> tuple[int, int]:
    stats = await channel_stats(http_address, topic)
    assert stats is not None
    return stats["in_flight_count"], stats["depth"] + stats["deferred_count"]


async def test_handler_exception_requeues_the_message(
    almanet_broker: BrokerAddresses, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()

    def handle(message: Message) -> None:
        if message.attempts == 1:
            raise RuntimeError("handler failed")
        inbox(message)

    async with Producer(tcp) as producer, consumer(tcp, topic, handle, requeue_delay=0.05):
        await producer.publish(topic, b"fails once")
        message = await inbox.next()
        message.fin()
    assert (message.body, message.attempts) == (b"fails once", 2)
    assert "the message handler raised" in caplog.text
    assert "handler failed" in caplog.text


@pytest.mark.parametrize("hook", [True, False], ids=["on_give_up", "default"])
async def test_max_attempts_gives_up_and_fins(
    almanet_broker: BrokerAddresses, topic: str, caplog: pytest.LogCaptureFixture, hook: bool
) -> None:
    tcp, http = almanet_broker.tcp_address, almanet_broker.http_address
    handled: list[int] = []
    given_up = Inbox()

    def handle(message: Message) -> None:
        handled.append(message.attempts)
        message.req(0)

    caplog.set_level(logging.WARNING, "almanet.nsq")
    async with (
        Producer(tcp) as producer,
        consumer(tcp, topic, handle, max_attempts=2, on_give_up=given_up if hook else None),
    ):
        await producer.publish(topic, b"poison")
        if hook:
            message = await given_up.next()
            assert (message.body, message.attempts) == (b"poison", 3)
            assert message.answered  # FINed by the consumer once the hook returned
        else:
            await eventually(lambda: "giving up" in caplog.text)
        await until(lambda: in_flight_and_queued(http, topic), (0, 0))
        await given_up.nothing(0.1)
    assert handled == [1, 2]


async def test_on_give_up_that_raises_still_fins(
    almanet_broker: BrokerAddresses, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    tcp, http = almanet_broker.tcp_address, almanet_broker.http_address

    def give_up(message: Message) -> None:
        raise RuntimeError("dead-letter queue down")

    async with (
        Producer(tcp) as producer,
        consumer(tcp, topic, lambda message: message.req(0), max_attempts=1, on_give_up=give_up),
    ):
        await producer.publish(topic, b"poison")
        await eventually(lambda: "on_give_up raised" in caplog.text)
        await until(lambda: in_flight_and_queued(http, topic), (0, 0))


# --- RDY ---------------------------------------------------------------------------


async def ready_counts_per_broker(brokers: Sequence[Broker], topic: str, *, any_order: bool = False) -> list[list[int]]:
    counts = [await ready_counts(broker.http_address, topic) for broker in brokers]
    return sorted(counts) if any_order else counts


async def test_max_in_flight_is_shared_as_rdy_across_brokers(topic: str) -> None:
    async with own_broker() as first, own_broker() as second:
        brokers = [first, second]
        addresses = [broker.tcp_address for broker in brokers]
        async with Consumer(topic, CHANNEL, Inbox(), nsqd_tcp_addresses=addresses, max_in_flight=10):
            await until(lambda: ready_counts_per_broker(brokers, topic), [[5], [5]])
        async with Consumer(topic, CHANNEL, Inbox(), nsqd_tcp_addresses=addresses, max_in_flight=11):
            await until(lambda: ready_counts_per_broker(brokers, topic, any_order=True), [[5], [6]])


async def test_rdy_1_rotates_when_brokers_outnumber_max_in_flight(topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(almanet.nsq.ready, "RDY_ROTATION_INTERVAL", 0.2)
    async with own_broker() as first, own_broker() as second:
        brokers = [first, second]
        addresses = [broker.tcp_address for broker in brokers]
        async with Consumer(topic, CHANNEL, Inbox(), nsqd_tcp_addresses=addresses, max_in_flight=1):
            await until(lambda: ready_counts_per_broker(brokers, topic, any_order=True), [[0], [1]])
            before = await ready_counts_per_broker(brokers, topic)
            await until(lambda: ready_counts_per_broker(brokers, topic), before[::-1])  # none starves


async def test_rdy_never_exceeds_the_brokers_max_rdy_count(topic: str) -> None:
    async with own_broker(max_rdy_count=10) as broker:
        inbox = Inbox()
        async with (
            Producer(broker.tcp_address) as producer,
            consumer(broker.tcp_address, topic, inbox, max_in_flight=100) as receiver,
        ):
            await until(lambda: ready_counts(broker.http_address, topic), [10])
            await producer.publish_batch(topic, [b"%d" % number for number in range(11)])
            held = [await inbox.next() for _ in range(10)]
            await inbox.nothing(0.1)
            held[0].fin()
            (await inbox.next()).fin()
            assert list(receiver.connections) == [broker.tcp_address]  # RDY 100 would have been fatal
            for message in held[1:]:
                message.fin()


async def test_backoff_pauses_then_probes_then_recovers(almanet_broker: BrokerAddresses, topic: str) -> None:
    """A failure: RDY 0 for backoff_unit, then RDY 1; two failures: twice as long; successes climb back."""
    tcp, http = almanet_broker.tcp_address, almanet_broker.http_address
    inbox = Inbox()
    # Requeued with a delay shorter than the backoff: nsqd's message pump may
    # hand a message requeued with none straight back, before it sees the
    # RDY 0 sent just ahead of the REQ.
    requeue_delay = DELAY / 4

    async def ready() -> list[int]:
        return await ready_counts(http, topic)

    async with (
        Producer(tcp) as producer,
        consumer(tcp, topic, inbox, max_in_flight=5, backoff=True, backoff_unit=DELAY) as receiver,
    ):
        await until(ready, [5])
        await producer.publish(topic, b"flaky")
        message = await inbox.next()
        failed = time.monotonic()
        message.req(requeue_delay, backoff=True)  # backoff level 1
        await until(ready, [0])
        probe, probed = await inbox.next_timed()
        assert probed - failed >= DELAY
        assert await ready() == [1]  # the probe, held

        failed = time.monotonic()
        probe.req(requeue_delay, backoff=True)  # level 2
        probe, probed = await inbox.next_timed()
        assert probed - failed >= 2 * DELAY

        probe.fin()  # level 1: another backoff_unit at RDY 0, then RDY 1
        assert [connection.ready_count for connection in receiver.connections.values()] == [0]
        await until(ready, [0])
        await until(ready, [1])
        await producer.publish(topic, b"fine")
        (await inbox.next()).fin()  # level 0: all of max_in_flight again
        await until(ready, [5])


async def test_backoff_without_requeue_delay_holds_the_message_back(embedded: BrokerAddresses, topic: str) -> None:
    """The RDY 0 reaches the broker before the REQ: the embedded broker would redeliver at once otherwise."""
    tcp = embedded.tcp_address
    inbox = Inbox()
    async with (
        Producer(tcp) as producer,
        consumer(tcp, topic, inbox, max_in_flight=5, backoff=True, backoff_unit=DELAY),
    ):
        await producer.publish(topic, b"flaky")
        message = await inbox.next()
        failed = time.monotonic()
        message.req(0, backoff=True)
        probe, probed = await inbox.next_timed()
        probe.fin()
    assert probe.attempts == 2
    assert probed - failed >= DELAY


async def test_backoff_probe_moves_on_from_a_broker_without_messages(
    topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's RDY 1 may land where there is nothing to consume: it moves to the next connection."""
    monkeypatch.setattr(almanet.nsq.ready, "RDY_ROTATION_INTERVAL", DELAY)
    async with own_broker() as first, own_broker() as second:
        # The probe starts at the first connection by address; the messages are on the other.
        busy = max(first, second, key=lambda broker: broker.tcp_address)
        inbox = Inbox()
        addresses = [first.tcp_address, second.tcp_address]
        async with (
            Producer(busy.tcp_address) as producer,
            Consumer(
                topic, CHANNEL, inbox, nsqd_tcp_addresses=addresses, max_in_flight=2, backoff=True, backoff_unit=0.1
            ),
        ):
            await producer.publish(topic, b"flaky")
            (await inbox.next()).req(0.05, backoff=True)
            probe = await inbox.next()
            probe.fin()
            assert probe.attempts == 2


# --- connections lost, brokers found --------------------------------------------------


async def test_consumer_and_producer_recover_when_the_broker_restarts(topic: str) -> None:
    broker = own_broker()
    await broker.start()
    address = broker.tcp_address
    inbox = Inbox()
    try:
        async with Producer(address) as producer, consumer(address, topic, inbox) as receiver:
            await producer.publish(topic, b"before")
            assert await inbox.take(1) == [b"before"]

            await broker.stop()
            await eventually(lambda: not receiver.connections)
            started = time.monotonic()
            with pytest.raises(ConnectionError):
                await producer.publish(topic, b"while down")
            assert time.monotonic() - started < 1.0  # at once, no waiting for the broker

            broker = own_broker(address)
            await broker.start()
            await eventually(lambda: address in receiver.connections)
            await producer.publish(topic, b"after")
            assert await inbox.take(1) == [b"after"]
    finally:
        await broker.stop()


async def test_lookupd_finds_the_broker(embedded: BrokerAddresses, topic: str) -> None:
    """The broker's own /lookup stands in for nsqlookupd (nsqd has none)."""
    inbox = Inbox()
    async with Producer(embedded.tcp_address) as producer:
        await producer.publish(topic, b"found you")  # /lookup knows topics that exist
        async with Consumer(topic, CHANNEL, inbox, lookupd_http_addresses=[f"http://{embedded.http_address}"]):
            assert await inbox.take(1) == [b"found you"]


@contextlib.asynccontextmanager
async def lookupd_consumer(lookupd: FakeLookupd, topic: str, inbox: Inbox, **settings: Any) -> AsyncIterator[Consumer]:
    async with Consumer(
        topic, CHANNEL, inbox, lookupd_http_addresses=[lookupd.http_address], lookupd_poll_interval=0.1, **settings
    ) as receiver:
        yield receiver


async def test_lookupd_polls_connect_new_brokers_and_keep_those_no_longer_listed_while_open(topic: str) -> None:
    async with own_broker() as first, own_broker() as second, FakeLookupd() as lookupd:
        inbox = Inbox()
        lookupd.producers = [first.tcp_address]
        async with lookupd_consumer(lookupd, topic, inbox, max_in_flight=2) as receiver:
            await until(lambda: ready_counts(first.http_address, topic), [2])

            lookupd.producers = [first.tcp_address, second.tcp_address]
            await until(lambda: ready_counts(second.http_address, topic), [1])
            assert await ready_counts(first.http_address, topic) == [1]
            async with Producer(second.tcp_address) as producer:
                await producer.publish(topic, b"from the newcomer")
            assert await inbox.take(1) == [b"from the newcomer"]

            lookupd.producers = [first.tcp_address]  # as a restarted nsqlookupd answers until nsqd register again
            await asyncio.sleep(0.3)
            assert sorted(receiver.connections) == sorted([first.tcp_address, second.tcp_address])

            await lookupd.close()  # unreachable: what the consumer has, it keeps
            await asyncio.sleep(0.3)
            assert sorted(receiver.connections) == sorted([first.tcp_address, second.tcp_address])


# --- graceful stop, heartbeats --------------------------------------------------------


async def test_stop_waits_for_messages_in_flight(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp, http = almanet_broker.tcp_address, almanet_broker.http_address
    inbox = Inbox()
    async with Producer(tcp) as producer:
        receiver = consumer(tcp, topic, inbox, max_in_flight=5)
        await receiver.start()
        await producer.publish(topic, b"slow")
        message = await inbox.next()
        stopping = asyncio.ensure_future(receiver.stop(timeout=TIMEOUT))
        await until(lambda: ready_counts(http, topic), [0])
        await producer.publish(topic, b"left for later")  # RDY 0: not sent to the stopping consumer
        await inbox.nothing(0.1)
        assert not stopping.done()

        message.fin()
        await asyncio.wait_for(stopping, TIMEOUT)
    assert not receiver.connections
    await until(lambda: client_count(http, topic), 0)
    stats = await channel_stats(http, topic)
    assert stats is not None
    assert (stats["clients"], stats["in_flight_count"], stats["depth"], stats["requeue_count"]) == ([], 0, 1, 0)


async def test_stop_gives_up_after_its_timeout(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp, http = almanet_broker.tcp_address, almanet_broker.http_address
    inbox = Inbox()
    async with Producer(tcp) as producer:
        receiver = consumer(tcp, topic, inbox)
        await receiver.start()
        await producer.publish(topic, b"never answered")
        await inbox.next()
        started = time.monotonic()
        await asyncio.wait_for(receiver.stop(timeout=DELAY), TIMEOUT)
        elapsed = time.monotonic() - started
    assert DELAY <= elapsed < DELAY + 1.0
    assert not receiver.connections
    await until(lambda: client_count(http, topic), 0)


async def client_count(http_address: str, topic: str) -> int | None:
    stats = await channel_stats(http_address, topic)
    return None if stats is None else len(stats["clients"])


async def test_heartbeats_keep_idle_connections_open(almanet_broker: BrokerAddresses, topic: str) -> None:
    """Idle past both ends' limit of two heartbeat intervals, the connections stay up."""
    tcp = almanet_broker.tcp_address
    options = ConnectionOptions(heartbeat_interval=1.0)
    inbox = Inbox()
    async with (
        Producer(tcp, options=options) as producer,
        consumer(tcp, topic, inbox, options=options) as receiver,
    ):
        publishing = await producer.connect()
        consuming = receiver.connections[tcp]
        await asyncio.sleep(3.0)
        assert publishing.is_open
        assert consuming.is_open
        await producer.publish(topic, b"still here")
        assert await inbox.take(1) == [b"still here"]
        assert await producer.connect() is publishing
        assert receiver.connections[tcp] is consuming


# --- interop -------------------------------------------------------------------------


def ansq_options() -> ansq.ConnectionOptions:
    return ansq.ConnectionOptions(auto_reconnect=False)


async def test_ansq_publishes_our_consumer_consumes(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    inbox = Inbox()
    writer = await asyncio.wait_for(ansq.create_writer([tcp], ansq_options()), TIMEOUT)
    try:
        async with consumer(tcp, topic, inbox, max_in_flight=10):
            for command in (
                writer.pub(topic, b"single"),
                writer.mpub(topic, b"multi 1", b"multi 2"),
                writer.dpub(topic, b"deferred", 50),
            ):
                response = await asyncio.wait_for(command, TIMEOUT)
                assert response.is_ok, response
            messages = [await inbox.next() for _ in range(4)]
            for message in messages:
                message.fin()
    finally:
        await writer.close()
    assert sorted(message.body for message in messages) == [b"deferred", b"multi 1", b"multi 2", b"single"]
    assert {message.attempts for message in messages} == {1}


async def test_our_producer_publishes_ansq_consumes(almanet_broker: BrokerAddresses, topic: str) -> None:
    tcp = almanet_broker.tcp_address
    reader = await asyncio.wait_for(
        ansq.create_reader(topic, CHANNEL, nsqd_tcp_addresses=[tcp], connection_options=ansq_options()), TIMEOUT
    )
    bodies = []
    try:
        async with Producer(tcp) as producer:
            await producer.publish(topic, b"single")
            await producer.publish_batch(topic, [b"multi 1", b"multi 2"])
            await producer.publish(topic, b"deferred", delay=0.05)
        for _ in range(4):
            message = await asyncio.wait_for(reader.wait_for_message(), TIMEOUT)
            await message.fin()
            assert message.attempts == 1
            bodies.append(message.body)
    finally:
        await reader.close()
    assert sorted(bodies) == [b"deferred", b"multi 1", b"multi 2", b"single"]
