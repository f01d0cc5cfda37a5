"""What TLS and compression cost (issue 13): RPC with 256 in flight, and consuming with a commit for each message.

Each connection setting (plaintext, TLS, snappy, deflate, TLS+snappy,
TLS+deflate) runs the same workloads on the same broker, started with
certificates made for it (``almanet.bench.certificates``): the caller in
this process, the service in a process of its own, both with the setting.
nsqd when there is one (ALMANET_NSQD or PATH), and the embedded broker.
Target: TLS costs at most 30% of plaintext throughput (a ratio of at least
0.7); the summary's speed ratios compare each setting with the others.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import almanet
from almanet.bench.brokers import Broker
from almanet.bench.certificates import Certificates, make_certificates
from almanet.bench.processes import stop, wait_for_line
from almanet.bench.workloads import windowed
from almanet.broker.nsqd import broker_process, find_nsqd, nsqd_process
from almanet.nsq import Consumer, Producer

IN_FLIGHT = 256
CALLS = 20_000
PAYLOAD = "x" * 100
MESSAGES = 50_000
ROUNDS = 5
BODY = b"x" * 200

SETTINGS = ["plaintext", "tls", "snappy", "deflate", "tls+snappy", "tls+deflate"]


def options_of(setting: str, certificates: Certificates) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for feature in setting.split("+"):
        if feature == "tls":
            options["tls_ca_file"] = certificates.ca
        elif feature != "plaintext":
            options[feature] = True
    return options


def _broker_kinds() -> list[str]:
    return ["nsqd", "embedded"] if find_nsqd() else ["embedded"]


@pytest.fixture(scope="module")
def certificates() -> Iterator[Certificates]:
    with tempfile.TemporaryDirectory(prefix="almanet-certificates-") as directory:
        yield make_certificates(directory)


@pytest.fixture(scope="module", params=_broker_kinds())
def secure_broker(request: pytest.FixtureRequest, certificates: Certificates) -> Iterator[Broker]:
    """A broker offering TLS (and, by default, snappy and deflate), in a process of its own."""
    tls = [f"-tls-cert={certificates.server_cert}", f"-tls-key={certificates.server_key}"]
    if request.param == "nsqd":
        executable = find_nsqd()
        assert executable is not None
        with nsqd_process(executable, "-mem-queue-size=10000000", *tls) as addresses:
            yield Broker("nsqd", *addresses)
        return
    command = [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0",
               "--mem-queue-size=10000000", *(f"-{flag}" for flag in tls)]  # fmt: skip
    with broker_process(command) as addresses:
        yield Broker("embedded", *addresses)


SERVICE = """
import asyncio, json, signal, sys
import almanet

async def main(address, name, options):
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    service = almanet.new_service(address, prefix=name, **options)

    @service.procedure
    async def echo(payload: str) -> str:
        return payload

    async with service:
        print("ready", flush=True)
        await stopping.wait()

asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""


@pytest.fixture
def service(secure_broker: Broker, setting: str, certificates: Certificates) -> Iterator[str]:
    """The echo service with the setting, in its process: the URI to call."""
    name = secure_broker.fresh_topic()
    options = json.dumps(options_of(setting, certificates))
    command = [sys.executable, "-c", textwrap.dedent(SERVICE), secure_broker.tcp_address, name, options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        wait_for_line(process, process.stdout, lambda line: line.strip() == "ready")
        yield f"{name}.echo"
    finally:
        stop(process)


async def call(address: str, uri: str, options: dict[str, Any]) -> None:
    async with almanet.new_session(address, **options) as session:
        await session.call(uri, PAYLOAD)  # joined, subscribed to replies and the service discovered: not timed
        await windowed(lambda: session.call(uri, PAYLOAD), CALLS, IN_FLIGHT)


@pytest.mark.parametrize("setting", SETTINGS)
def test_rpc_256_in_flight(
    benchmark: BenchmarkFixture, secure_broker: Broker, service: str, setting: str, certificates: Certificates
) -> None:
    benchmark.group = f"secure RPC, {IN_FLIGHT} in flight, {secure_broker.name}"
    options = options_of(setting, certificates)
    benchmark.pedantic(lambda: asyncio.run(call(secure_broker.tcp_address, service, options)), rounds=ROUNDS)
    benchmark.extra_info["msgs_per_s"] = CALLS / benchmark.stats.stats.median


async def fill(address: str, topic: str) -> None:
    """The channel ``bench`` of ``topic`` holding MESSAGES messages (published in plaintext)."""
    async with Producer(address) as producer:
        await producer.publish_batch(topic, [BODY])
        async with Consumer(topic, "bench", lambda message: message.fin(), nsqd_tcp_addresses=[address]):
            pass  # SUB created the channel: from now on it keeps every message
        for _ in range(MESSAGES // 200):
            await producer.publish_batch(topic, [BODY] * 200)


async def consume(address: str, topic: str, options: dict[str, Any]) -> None:
    async with almanet.new_session(address, **options) as session:
        received = 0
        async with session.consume(topic, "bench", max_in_flight=2500) as messages:
            async for message in messages:
                message.commit()
                received += 1
                if received == MESSAGES:
                    break


@pytest.mark.parametrize("setting", SETTINGS)
def test_consume_with_commit(
    benchmark: BenchmarkFixture, secure_broker: Broker, setting: str, certificates: Certificates
) -> None:
    benchmark.group = f"secure consume with commit, {secure_broker.name}"
    options = options_of(setting, certificates)
    address = secure_broker.tcp_address

    def setup() -> tuple[tuple[str], dict[str, Any]]:  # a topic of the round's own, its messages waiting: not timed
        topic = secure_broker.fresh_topic()
        asyncio.run(fill(address, topic))
        return (topic,), {}

    benchmark.pedantic(lambda topic: asyncio.run(consume(address, topic, options)), setup=setup, rounds=ROUNDS)
    benchmark.extra_info["msgs_per_s"] = MESSAGES / benchmark.stats.stats.median
