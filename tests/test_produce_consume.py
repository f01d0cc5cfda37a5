"""Produce and consume through a session (embedded broker, or nsqd with ALMANET_TEST_NSQD)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ansq
import msgpack
import pytest

import almanet
from almanet.pytest_plugin import BrokerAddresses
from almanet.subscription import ConsumedMessage, traced_body
from helpers import eventually

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


async def test_produced_payloads_are_consumed_and_committed(session: almanet.Session, topic: str) -> None:
    payloads = [{"order": 1}, "text", 3, [1, 2], None]
    await asyncio.gather(*(session.produce(topic, payload) for payload in payloads))
    received = []
    async with session.consume(topic, "ch") as messages:
        async for message in messages:
            received.append(message.payload)
            message.commit()
            if len(received) == len(payloads):
                break
    assert received == payloads


async def test_what_is_produced_comes_back_as_the_same_value(session: almanet.Session, topic: str) -> None:
    values = [b"\x00raw", b"\x01", b"", "text", 1, 1.5, None, True, [1, b"x"], {"k": b"v", 2: [None]}]
    for value in values:
        await session.produce(topic, value)
    await session.produce_batch(topic, values)
    received = []
    messages, stop = await session.consume(topic, "ch")  # the pair form
    while len(received) < 2 * len(values):
        message = await asyncio.wait_for(anext(messages), TIMEOUT)
        received.append(message.payload)
        message.commit()
    await stop()
    assert received == values * 2


async def test_a_raw_body_goes_as_it_is_and_is_read_from_body(session: almanet.Session, topic: str) -> None:
    await session.produce(topic, b"\x00raw", raw=True)
    await session.produce_batch(topic, [b"\x01", bytearray(b"{}")], raw=True)
    with pytest.raises(TypeError, match="a raw body is bytes, not str"):
        session.produce(topic, "text", raw=True)
    messages, stop = await session.consume(topic, "ch")
    bodies = []
    for _ in range(3):
        message = await asyncio.wait_for(anext(messages), TIMEOUT)
        bodies.append(message.body)
        if message.body == b"\x00raw":
            with pytest.raises(almanet.UnreadableBody, match=r"Read its \.body"):
                message.payload  # noqa: B018
        message.commit()
    await stop()
    assert bodies == [b"\x00raw", b"\x01", b"{}"]


async def test_a_batch_is_published_at_once_and_in_order(session: almanet.Session, topic: str) -> None:
    assert await session.produce_batch(topic, [f"item {number}" for number in range(50)]) == b"OK"
    async with session.consume(topic, "ch", max_in_flight=50) as messages:
        received = []
        async for message in messages:
            received.append(message.payload)
            message.commit()
            if len(received) == 50:
                break
    assert received == [f"item {number}" for number in range(50)]


async def test_rollback_redelivers_with_attempts_counted(session: almanet.Session, topic: str) -> None:
    await session.produce(topic, "retry me")
    attempts = []
    async with session.consume(topic, "ch") as messages:
        async for message in messages:
            attempts.append((message.attempts, time.monotonic()))
            if message.attempts < 3:
                message.rollback(delay=0.1)
            else:
                message.commit()
                break
    assert [attempt for attempt, _ in attempts] == [1, 2, 3]
    assert attempts[1][1] - attempts[0][1] >= 0.09


async def test_delayed_produce_arrives_after_its_delay(session: almanet.Session, topic: str) -> None:
    async with session.consume(topic, "ch") as messages:
        sent = time.monotonic()
        await session.produce(topic, "later", delay=0.3)
        # nsqd's queue scan finds a channel up to 5 s after it was made: a deferred message waits that long.
        message = await asyncio.wait_for(anext(messages), 3 * TIMEOUT)
        message.commit()
    assert message.payload == "later"
    assert time.monotonic() - sent >= 0.3


async def test_stop_gives_back_what_was_not_handed_out(session: almanet.Session, topic: str) -> None:
    await session.produce_batch(topic, list(range(10)))
    first = session.consume(topic, "ch", max_in_flight=10)
    message = await asyncio.wait_for(anext(first), TIMEOUT)
    message.commit()
    await asyncio.sleep(0.1)  # the other nine have arrived too, unread
    await asyncio.wait_for(first.stop(), TIMEOUT)
    received = []

    async def receive_the_rest() -> None:
        async with session.consume(topic, "ch", max_in_flight=10) as second:
            async for message in second:
                received.append(message.payload)
                message.commit()
                if len(received) == 9:
                    break

    await asyncio.wait_for(receive_the_rest(), TIMEOUT)  # at once: not after their msg_timeout
    assert sorted(received) == list(range(1, 10))


async def test_leaving_the_session_stops_its_consumers(almanet_broker: BrokerAddresses, topic: str) -> None:
    session = almanet.new_session(almanet_broker.tcp_address)
    async with session:
        messages = session.consume(topic, "ch")
        await messages.start()
        waiting = asyncio.ensure_future(anext(messages))
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, TIMEOUT)


async def test_ansq_consumes_what_a_session_produces(
    almanet_broker: BrokerAddresses, session: almanet.Session, topic: str
) -> None:
    await session.produce(topic, b"raw for ansq", raw=True)
    await session.produce(topic, {"msgpack": "for ansq"})
    reader = await ansq.create_reader(topic, "ch", nsqd_tcp_addresses=[almanet_broker.tcp_address])
    try:
        bodies = []
        async for message in reader.messages():
            bodies.append(message.body)
            await message.fin()
            if len(bodies) == 2:
                break
    finally:
        await reader.close()
    assert bodies == [b"raw for ansq", msgpack.packb({"msgpack": "for ansq"})]


@pytest.mark.parametrize("leave", ["break", "raise"])
async def test_leaving_an_async_for_loop_rolls_back_what_it_did_not_commit_at_once(
    session: almanet.Session, topic: str, leave: str
) -> None:
    """A break (or an exception in the loop body) before commit(): the message is handed out again within a second,
    not after its msg_timeout; what the loop committed stays committed."""
    await session.produce_batch(topic, ["committed", "left"])
    seen = []
    with pytest.raises(RuntimeError) if leave == "raise" else contextlib.nullcontext():
        async for message in session.consume(topic, "ch", msg_timeout=60.0):
            seen.append(message.payload)
            if message.payload == "committed":
                message.commit()
                continue
            if leave == "raise":
                raise RuntimeError("the loop body failed")
            break
    assert seen == ["committed", "left"]
    started = time.monotonic()
    async with session.consume(topic, "ch") as again:
        message = await asyncio.wait_for(anext(again), TIMEOUT)
        assert (message.payload, message.attempts) == ("left", 2)
        message.commit()
    assert time.monotonic() - started < 1.0


async def test_messages_committed_right_after_the_loop_stay_committed(session: almanet.Session, topic: str) -> None:
    """A batch taken in an async for loop and committed after it, before anything is awaited."""
    await session.produce_batch(topic, list(range(5)))
    batch = []
    async for message in session.consume(topic, "ch"):
        batch.append(message)
        if len(batch) == 5:
            break
    for message in batch:
        message.commit()
    await session.produce(topic, "next")
    async with session.consume(topic, "ch") as again:
        message = await asyncio.wait_for(anext(again), TIMEOUT)
        assert message.payload == "next"
        message.commit()


async def test_a_payload_that_cannot_be_encoded_raises_unencodable_payload_everywhere(
    almanet_broker: BrokerAddresses, session: almanet.Session, topic: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=topic)

    @service.procedure
    async def echo(payload: Any) -> Any:
        return payload

    async with service:
        for payload in (object(), 2**70, {1j: 2}):
            sends = (
                lambda payload=payload: session.produce(topic, payload),
                lambda payload=payload: session.produce_batch(topic, [payload]),
                lambda payload=payload: session.delay_call(f"{topic}.echo", payload, 1.0),
            )
            for send in sends:
                with pytest.raises(almanet.UnencodablePayload, match="the payload cannot be encoded") as raised:
                    send()
                assert isinstance(raised.value, TypeError) and isinstance(raised.value, almanet.AlmanetError)
            with pytest.raises(almanet.UnencodablePayload):
                await session.call(f"{topic}.echo", payload)


async def test_stop_waits_for_the_messages_an_async_for_loop_handed_to_workers(
    session: almanet.Session, topic: str
) -> None:
    """A loop that ends because the subscription stopped rolls back nothing: the workers commit what they took."""
    await session.produce_batch(topic, list(range(5)))
    subscription = session.consume(topic, "ch")
    workers: list[asyncio.Future[None]] = []
    committed: list[int] = []

    async def handle(message: almanet.ConsumedMessage) -> None:
        await asyncio.sleep(0.3)
        message.commit()
        committed.append(message.payload)

    def hand_over(message: almanet.ConsumedMessage) -> None:
        workers.append(asyncio.ensure_future(handle(message)))

    async def read() -> None:
        async for message in subscription:
            hand_over(message)

    reading = asyncio.ensure_future(read())
    await eventually(lambda: len(workers) == 5)
    await subscription.stop()  # returns once the 5 are answered
    await reading
    await asyncio.gather(*workers)  # none found its message answered already
    assert sorted(committed) == list(range(5))


async def test_several_readers_of_one_subscription_all_end_when_it_stops(session: almanet.Session, topic: str) -> None:
    subscription = session.consume(topic, "ch")
    await subscription.start()
    readers = [asyncio.ensure_future(anext(subscription)) for _ in range(3)]
    await asyncio.sleep(0.1)
    await session.produce(topic, "one")
    await eventually(lambda: any(reader.done() for reader in readers))
    (got,) = [reader.result() for reader in readers if reader.done()]
    assert got.payload == "one"
    got.commit()
    await subscription.stop()
    results = await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), TIMEOUT)
    assert sum(isinstance(result, StopAsyncIteration) for result in results) == 2


async def test_a_consumer_not_traced_unwraps_a_traced_body(session: almanet.Session, topic: str) -> None:
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    await session.produce(topic, traced_body(headers, msgpack.packb({"n": 1})), raw=True)
    async for message in session.consume(topic, "ch"):
        assert isinstance(message, ConsumedMessage)
        assert (message.headers, message.payload) == (headers, {"n": 1})
        message.commit()
        break
