"""Typed payloads (issue 12): what a payload annotation costs a service, and a call.

- The service-side step: decode an invocation and check its payload (an
  unannotated or ``str`` payload: the isinstance fast path), or check and
  convert it to a dataclass (msgspec) or a pydantic model.
- End to end: calls with a ``str`` payload against calls whose payload and
  result are dataclasses (the caller encodes the dataclass as builtins, the
  service converts it in and its result out, the caller converts the result
  back), caller and service in this process, on the benchmark broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import almanet
from almanet._speedups.envelope import decode, encode_invocation
from almanet.bench.brokers import Broker
from almanet.bench.workloads import windowed

REPLY_TO = "_almanet.reply.0123456789abcdef#ephemeral"
DEADLINE = 1_767_225_600_000
TEXT = "x" * 100
IN_FLIGHT = 256
CALLS = 2_000


@dataclasses.dataclass
class Order:
    item: str
    count: int
    note: str


ORDER = Order("tea", 2, TEXT)
ORDER_ON_THE_WIRE = dataclasses.asdict(ORDER)

try:
    import pydantic

    class Model(pydantic.BaseModel):
        item: str
        count: int
        note: str

except ImportError:  # an optional extra
    pydantic = None


def procedures(service: almanet.Service) -> dict[str, tuple[Any, Any]]:
    """Each case's procedure, and the payload a caller sends it."""

    @service.procedure
    async def unannotated(payload):  # type: ignore[no-untyped-def]
        return payload

    @service.procedure
    async def text(payload: str) -> str:
        return payload

    @service.procedure
    async def order(payload: Order) -> Order:
        return payload

    cases: dict[str, tuple[Any, Any]] = {
        "no annotation": (unannotated, TEXT),
        "str": (text, TEXT),
        "dataclass": (order, ORDER),
    }
    if pydantic is None:
        return cases

    @service.procedure
    async def model(payload: Model) -> Model:
        return payload

    cases["pydantic model"] = (model, Model(**ORDER_ON_THE_WIRE))
    return cases


SERVICE = almanet.new_service("127.0.0.1:4150", prefix="bench.typed")  # registers only: never started
CASES = procedures(SERVICE)


def receive(procedure: Any, payload: Any) -> Callable[[], Any]:
    """What the service does with an invocation before calling the function (Service._receive_invocation)."""
    wire = ORDER_ON_THE_WIRE if dataclasses.is_dataclass(payload) or hasattr(payload, "model_dump") else payload
    body = encode_invocation(1, REPLY_TO, DEADLINE, None, wire)

    def run() -> Any:
        payload = decode(body).payload
        if not procedure.takes(payload):
            payload = procedure.receive(payload)
        return payload

    return run


@pytest.mark.benchmark(group="service side: decode an invocation and check or convert its payload")
@pytest.mark.parametrize("case", CASES)
def test_receive_payload(benchmark: BenchmarkFixture, case: str) -> None:
    procedure, payload = CASES[case]
    received = benchmark(receive(procedure, payload))
    assert received == payload


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calling(bench_broker: Broker) -> Iterator[tuple[asyncio.AbstractEventLoop, almanet.Session, dict[str, Any]]]:
    """A service with both procedures and a session, running on a loop of their own."""
    loop = asyncio.new_event_loop()
    service = almanet.new_service(bench_broker.tcp_address, prefix=f"bench.typed.{os.getpid()}")
    cases = procedures(service)
    session = almanet.new_session(bench_broker.tcp_address)
    loop.run_until_complete(service.start())
    loop.run_until_complete(session.join())
    try:
        yield loop, session, cases
    finally:
        loop.run_until_complete(session.leave())
        loop.run_until_complete(service.stop())
        loop.close()


@pytest.mark.parametrize("case", ["str", "dataclass"])
def test_rpc_typed_payload(
    benchmark: BenchmarkFixture,
    bench_broker: Broker,
    calling: tuple[asyncio.AbstractEventLoop, almanet.Session, dict[str, Any]],
    case: str,
) -> None:
    loop, session, cases = calling
    procedure, payload = cases[case]
    benchmark.group = f"RPC, {IN_FLIGHT} in flight, caller and service in one process, {bench_broker.name}"
    reply = loop.run_until_complete(session.call(procedure, payload))
    assert reply.payload == payload
    loop.run_until_complete(windowed(lambda: session.call(procedure, payload), 500, IN_FLIGHT))  # warm-up

    cpu: list[float] = []

    def run() -> None:
        started = time.process_time()
        loop.run_until_complete(windowed(lambda: session.call(procedure, payload), CALLS, IN_FLIGHT))
        cpu.append(time.process_time() - started)

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["msgs_per_s"] = CALLS / benchmark.stats.stats.median
    # The CPU time of this process (caller and service) is steadier than wall time on a shared machine.
    benchmark.extra_info["cpu_us_per_call"] = min(cpu) / CALLS * 1e6
