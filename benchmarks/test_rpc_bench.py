"""Concurrent RPC, caller and service in separate processes (issue 5).

Target: almanet with 256 calls in flight >= 10x the baseline written the way
the original design did it (almanet.bench.baseline: ansq transport, JSON
envelope, one future per call id), through the same broker.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import almanet
from almanet.bench import baseline
from almanet.bench.brokers import Broker
from almanet.bench.workers import service_process
from almanet.bench.workloads import windowed

IN_FLIGHT = 256
CALLS = 5_000
PAYLOAD = "x" * 100


@pytest.fixture(scope="module")
def services(bench_broker: Broker) -> Iterator[dict[str, str]]:
    """Both services running, each in its process: the name to call for each."""
    name = f"bench.rpc.{os.getpid()}"
    with (
        service_process("almanet", bench_broker.tcp_address, name),
        service_process("baseline", bench_broker.tcp_address, f"{name}.baseline"),
    ):
        yield {"almanet": f"{name}.echo", "baseline": f"{name}.baseline"}


async def call_with_almanet(address: str, uri: str, count: int) -> None:
    async with almanet.new_session(address) as session:
        await windowed(lambda: session.call(uri, PAYLOAD), count, IN_FLIGHT)


async def call_with_baseline(address: str, topic: str, count: int) -> None:
    async with baseline.BaselineCaller(address) as caller:
        await windowed(lambda: caller.call(topic, PAYLOAD), count, IN_FLIGHT)


CALLERS = {"almanet": call_with_almanet, "baseline": call_with_baseline}


@pytest.mark.parametrize("client", CALLERS)
def test_rpc_256_in_flight(
    benchmark: BenchmarkFixture, bench_broker: Broker, services: dict[str, str], client: str
) -> None:
    benchmark.group = f"RPC, {IN_FLIGHT} in flight, calls per second, {bench_broker.name}"
    calls = CALLS
    caller = CALLERS[client]
    benchmark.pedantic(lambda: asyncio.run(caller(bench_broker.tcp_address, services[client], calls)), rounds=3)
    benchmark.extra_info["msgs_per_s"] = calls / benchmark.stats.stats.median
