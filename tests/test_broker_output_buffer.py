"""When a consumer gets its messages: nsqd's output buffering, the same on both brokers.

nsqd buffers what it writes to a client (``output_buffer_size``, 16 KiB by
default) and flushes messages on a ticker (``output_buffer_timeout``, 250 ms
by default): a tick that came while the client had nothing buffered flushes
the next message at once, later ones wait for the following tick. It flushes
at once when the client is ready for no more messages (RDY used up or
lowered), with every response, error and heartbeat, and when the buffer is
full. Tests negotiate short or long flush intervals to tell these apart with
generous bounds, and each takes under 2 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from rawnsq import RawConnection

from almanet._speedups.frames import (
    ErrorFrame,
    MessageFrame,
    ResponseFrame,
    encode_fin,
    encode_pub,
    encode_rdy,
)
from almanet.wire.protocol import HEARTBEAT, OK

pytestmark = pytest.mark.asyncio


async def publish(producer: RawConnection, topic: str, body: bytes = b"x") -> float:
    """Publish ``body``; the time it was sent."""
    sent = time.monotonic()
    producer.send(encode_pub(topic, body))
    assert await producer.frame() == ResponseFrame(OK)
    return sent


async def latencies(tcp: str, topic: str, consumer: RawConnection, count: int) -> list[float]:
    """Seconds each of ``count`` messages, published one after the other is received and FINed, takes to arrive."""
    producer = await RawConnection.open(tcp)
    taken = []
    for _ in range(count):
        sent = await publish(producer, topic)
        message = await consumer.message()
        taken.append(time.monotonic() - sent)
        consumer.send(encode_fin(message.id))
    await producer.close()
    return taken


async def test_a_message_soon_after_another_waits_for_the_next_tick(tcp: str, topic: str) -> None:
    consumer = await RawConnection.open(tcp)
    await consumer.identify(output_buffer_timeout=500)  # the ticker starts now
    ticker_started = time.monotonic()
    consumer.send(b"SUB " + topic.encode() + b" c\n")
    assert await consumer.frame() == ResponseFrame(OK)
    consumer.send(encode_rdy(10))
    await asyncio.sleep(ticker_started + 0.6 - time.monotonic())  # a tick came meanwhile, at 0.5 s
    first, second = await latencies(tcp, topic, consumer, 2)
    assert first < 0.25  # flushed by the tick that came meanwhile
    assert 0.25 < second < 0.75  # waits for the tick at 1 s
    await consumer.close()


async def test_messages_one_after_another_each_wait_about_the_flush_interval(tcp: str, topic: str) -> None:
    """Like sequential calls over nsqd with its defaults, which take its 250 ms each."""
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=10, output_buffer_timeout=100)
    taken = await latencies(tcp, topic, consumer, 7)
    # The first two may be quicker: the first tick may have come already, the next be near.
    # Of the others, on a noisy machine, one may come late enough to find its tick near.
    assert sorted(taken[2:])[1] > 0.05
    assert 0.05 < statistics.median(taken[2:]) < 0.2
    assert max(taken) < 0.4
    await consumer.close()


async def test_unbuffered_output_sends_each_message_at_once(tcp: str, topic: str) -> None:
    consumer = await RawConnection.open(tcp)
    negotiated = await consumer.identify(output_buffer_size=-1)
    assert (negotiated["output_buffer_size"], negotiated["output_buffer_timeout"]) == (1, 0)
    consumer.send(b"SUB " + topic.encode() + b" c\n")
    assert await consumer.frame() == ResponseFrame(OK)
    consumer.send(encode_rdy(10))
    taken = await latencies(tcp, topic, consumer, 5)
    assert statistics.median(taken) < 0.05
    assert max(taken) < 0.25
    await consumer.close()


async def test_a_consumer_ready_for_no_more_gets_each_message_at_once(tcp: str, topic: str) -> None:
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=1, output_buffer_timeout=1000)
    taken = await latencies(tcp, topic, consumer, 5)
    assert max(taken) < 0.5
    await consumer.close()


async def test_lowering_rdy_flushes_what_is_buffered(tcp: str, topic: str) -> None:
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=10, output_buffer_timeout=1000)
    producer = await RawConnection.open(tcp)
    await publish(producer, topic)
    await consumer.nothing(0.3)  # buffered until the tick at 1 s
    lowered = time.monotonic()
    consumer.send(encode_rdy(1))  # one in flight: ready for no more
    await consumer.message()
    assert time.monotonic() - lowered < 0.3
    await producer.close()
    await consumer.close()


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        (encode_pub("other", b"y"), ResponseFrame(OK)),
        (encode_fin(b"0123456789abcdef"), ErrorFrame(b"E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")),
    ],
    ids=["response", "error"],
)
async def test_an_answer_flushes_the_messages_buffered_before_it(
    tcp: str, topic: str, command: bytes, answer: ResponseFrame | ErrorFrame
) -> None:
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=10, output_buffer_timeout=1000)
    producer = await RawConnection.open(tcp)
    await publish(producer, topic)
    await consumer.nothing(0.3)  # buffered until the tick at 1 s
    asked = time.monotonic()
    consumer.send(command)
    assert isinstance(await consumer.frame(), MessageFrame)
    assert await consumer.frame() == answer
    assert time.monotonic() - asked < 0.3
    await producer.close()
    await consumer.close()


async def test_without_a_ticker_heartbeats_flush(tcp: str, topic: str) -> None:
    consumer = await RawConnection.open(tcp)
    negotiated = await consumer.identify(output_buffer_timeout=-1, heartbeat_interval=1000)
    identified = time.monotonic()
    assert (negotiated["output_buffer_size"], negotiated["output_buffer_timeout"]) == (16384, 0)
    consumer.send(b"SUB " + topic.encode() + b" c\n")
    assert await consumer.frame() == ResponseFrame(OK)
    consumer.send(encode_rdy(10))
    producer = await RawConnection.open(tcp)
    await publish(producer, topic)
    assert isinstance(await consumer.frame(), MessageFrame)
    assert await consumer.frame(heartbeats=True) == ResponseFrame(HEARTBEAT)  # flushed with the message
    assert 0.8 < time.monotonic() - identified < 1.5
    await producer.close()
    await consumer.close()


async def test_a_message_that_does_not_fit_the_buffer_flushes_it(tcp: str, topic: str) -> None:
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=10, output_buffer_size=64, output_buffer_timeout=1000)
    producer = await RawConnection.open(tcp)
    await publish(producer, topic, b"small")  # a 39-byte frame: buffered
    await consumer.nothing(0.3)
    sent = await publish(producer, topic, b"x" * 100)  # 134 bytes: fills the buffer, the rest goes straight out
    assert [message.body for message in await consumer.messages(2)] == [b"small", b"x" * 100]
    assert time.monotonic() - sent < 0.3
    await producer.close()
    await consumer.close()
