"""almanet's NSQ client against ansq (issue 4), on each broker (see conftest.py) in its own process.

Targets: publishing 200-byte messages with 64 publishes in flight >= 5x ansq
with 64 in flight; batch publishing (MPUB x200) >= ansq's MPUB x200;
consuming with a FIN for each message >= 3x ansq's reader with RDY 2500.
Each round publishes or consumes MESSAGES messages on a topic of its own.
"""

from __future__ import annotations

import asyncio

import ansq
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from almanet.bench.brokers import Broker
from almanet.bench.workloads import windowed
from almanet.nsq import Consumer, Message, Producer

BODY = b"x" * 200
MESSAGES = 10_000  # nsqd's default mem-queue-size: no round spills to disk
IN_FLIGHT = 64
BATCH = 200


def ansq_options() -> ansq.ConnectionOptions:
    return ansq.ConnectionOptions(auto_reconnect=False)


async def publish_with_almanet(address: str, topic: str, batch: bool) -> None:
    async with Producer(address) as producer:
        if batch:
            bodies = [BODY] * BATCH
            for _ in range(MESSAGES // BATCH):
                await producer.publish_batch(topic, bodies)
        else:
            await windowed(lambda: producer.publish(topic, BODY), MESSAGES, IN_FLIGHT)


async def publish_with_ansq(address: str, topic: str, batch: bool) -> None:
    writer = await ansq.create_writer([address], connection_options=ansq_options())
    try:
        if batch:
            bodies = [BODY] * BATCH
            for _ in range(MESSAGES // BATCH):
                await writer.mpub(topic, *bodies)
        else:
            await windowed(lambda: writer.pub(topic, BODY), MESSAGES, IN_FLIGHT)
    finally:
        await writer.close()


async def fill(address: str, topic: str) -> str:
    """``topic`` created with a channel holding MESSAGES messages."""
    async with Producer(address) as producer:
        await producer.publish_batch(topic, [b"x"])  # creates the topic
    consumer = Consumer(topic, "bench", lambda message: message.fin(), nsqd_tcp_addresses=[address], max_in_flight=1)
    async with consumer:
        pass  # SUB created the channel: from now on it keeps every message
    async with Producer(address) as producer:
        for _ in range(MESSAGES // BATCH):
            await producer.publish_batch(topic, [BODY] * BATCH)
    return topic


async def consume_with_almanet(address: str, topic: str) -> None:
    done = asyncio.get_running_loop().create_future()
    received = 0

    def on_message(message: Message) -> None:
        nonlocal received
        message.fin()
        received += 1
        if received == MESSAGES:
            done.set_result(None)

    async with Consumer(topic, "bench", on_message, nsqd_tcp_addresses=[address], max_in_flight=2500):
        await asyncio.wait_for(done, 60)


async def consume_with_ansq(address: str, topic: str) -> None:
    reader = await ansq.create_reader(topic, "bench", nsqd_tcp_addresses=[address], connection_options=ansq_options())
    try:
        for connection in reader.connections:
            await connection.rdy(2500)
        received = 0
        async for message in reader.messages():
            await message.fin()
            received += 1
            if received == MESSAGES:
                break
    finally:
        await reader.close()


PUBLISHERS = {"almanet": publish_with_almanet, "ansq": publish_with_ansq}
CONSUMERS = {"almanet": consume_with_almanet, "ansq": consume_with_ansq}


@pytest.mark.parametrize("client", PUBLISHERS)
def test_publish_64_in_flight(benchmark: BenchmarkFixture, bench_broker: Broker, client: str) -> None:
    benchmark.group = f"publish {MESSAGES // 1000}k x 200 B, {IN_FLIGHT} in flight, {bench_broker.name}"
    publish = PUBLISHERS[client]
    benchmark.pedantic(
        lambda topic: asyncio.run(publish(bench_broker.tcp_address, topic, False)),
        setup=lambda: ((bench_broker.fresh_topic(),), {}),
        rounds=7,
    )
    benchmark.extra_info["msgs_per_s"] = MESSAGES / benchmark.stats.stats.median


@pytest.mark.parametrize("client", PUBLISHERS)
def test_publish_batches(benchmark: BenchmarkFixture, bench_broker: Broker, client: str) -> None:
    benchmark.group = f"publish {MESSAGES // 1000}k x 200 B, MPUB x{BATCH}, {bench_broker.name}"
    publish = PUBLISHERS[client]
    benchmark.pedantic(
        lambda topic: asyncio.run(publish(bench_broker.tcp_address, topic, True)),
        setup=lambda: ((bench_broker.fresh_topic(),), {}),
        rounds=7,
    )
    benchmark.extra_info["msgs_per_s"] = MESSAGES / benchmark.stats.stats.median


@pytest.mark.parametrize("client", CONSUMERS)
def test_consume_with_fin(benchmark: BenchmarkFixture, bench_broker: Broker, client: str) -> None:
    address = bench_broker.tcp_address
    benchmark.group = f"consume {MESSAGES // 1000}k x 200 B, FIN each, RDY 2500, {bench_broker.name}"
    consume = CONSUMERS[client]
    benchmark.pedantic(
        lambda topic: asyncio.run(consume(address, topic)),
        setup=lambda: ((asyncio.run(fill(address, bench_broker.fresh_topic())),), {}),
        rounds=7,
    )
    benchmark.extra_info["msgs_per_s"] = MESSAGES / benchmark.stats.stats.median
