"""Broker relay throughput (issue 3): 200-byte messages through one topic and channel.

One client publishes with MPUB x200, one consumes with RDY 2500 and FINs each
message; both are bare asyncio protocols on the compiled codec, in this
process, while the broker runs in a process of its own, as nsqd would. It runs
on the embedded broker and on nsqd when one is found (see conftest.py), so the
summary gives the ratio. Target: at least a quarter of nsqd's figure.
"""

from __future__ import annotations

import asyncio
from typing import cast

from pytest_benchmark.fixture import BenchmarkFixture

from almanet._speedups.frames import (
    FrameReader,
    MessageFrame,
    ResponseFrame,
    encode_fin,
    encode_identify,
    encode_mpub,
    encode_rdy,
    encode_sub,
)
from almanet.bench.brokers import Broker
from almanet.wire.protocol import MAGIC_V2

BODY = b"x" * 200
BATCH = [BODY] * 200
MESSAGES = 100_000
WINDOW = 5_000  # published but not yet consumed, well under the default mem-queue-size


class Consumer(asyncio.Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.progress = asyncio.Event()
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its API.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        fins = [encode_fin(frame.id) for frame in self._reader if type(frame) is MessageFrame]
        if fins:
            assert self._transport is not None
            self._transport.write(b"".join(fins))
            self.received += len(fins)
            self.progress.set()
            if self.received >= self.expected and not self.done.done():
                self.done.set_result(None)


class Publisher(asyncio.Protocol):
    """Reads the broker's answers: every MPUB must be answered OK."""

    def __init__(self) -> None:
        self._reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        for frame in self._reader:
            assert type(frame) is ResponseFrame, frame


async def relay(address: str, topic: str) -> None:
    loop = asyncio.get_running_loop()
    host, _, port = address.rpartition(":")
    consumer_transport, consumer = await loop.create_connection(lambda: Consumer(MESSAGES), host, int(port))
    # nsqd's shortest output-buffer tick, as almanet's consume() asks for: the
    # last messages of a round wait 25 ms for it, not nsqd's default 250 ms.
    identify = encode_identify({"output_buffer_timeout": 25})
    consumer_transport.write(MAGIC_V2 + identify + encode_sub(topic, "relay") + encode_rdy(2500))
    publisher_transport, _ = await loop.create_connection(Publisher, host, int(port))
    publisher_transport.write(MAGIC_V2)
    command = encode_mpub(topic, BATCH)
    published = 0
    while published < MESSAGES:
        if published - consumer.received < WINDOW:
            publisher_transport.write(command)
            published += len(BATCH)
        else:
            consumer.progress.clear()
            await consumer.progress.wait()
    await asyncio.wait_for(consumer.done, 60)
    consumer_transport.close()
    publisher_transport.close()


def test_relay_throughput(benchmark: BenchmarkFixture, bench_broker: Broker) -> None:
    benchmark.group = "broker relay, 100k x 200 B"
    benchmark.pedantic(
        lambda topic: asyncio.run(relay(bench_broker.tcp_address, topic)),
        setup=lambda: ((bench_broker.fresh_topic(),), {}),
        rounds=5,
        warmup_rounds=1,
    )
    benchmark.extra_info["msgs_per_s"] = MESSAGES / benchmark.stats.stats.median
