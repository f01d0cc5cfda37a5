"""OpenTelemetry (almanet.otel): spans and metrics of calls, invocations and messages, on both brokers.

In this process with OpenTelemetry's in-memory exporters; across processes,
one trace from this caller through two services in two processes, one of
them set up by ``opentelemetry-instrument`` alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import almanet
from almanet import observer
from almanet.broker.nsqd import Cluster
from almanet.otel import AlmanetInstrumentor
from almanet.pytest_plugin import brokers_available
from helpers import PROJECT, broker_of_kind, eventually, free_port, wait_until_served


class Telemetry:
    """What the instrumented code exported: finished spans, and metrics read on demand."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def finished(self, name: str, kind: SpanKind) -> list[ReadableSpan]:
        return [span for span in self.spans.get_finished_spans() if span.name == name and span.kind is kind]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            point
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for found in scope.metrics
            if found.name == metric
            for point in found.data.data_points
        ]

    def count(self, metric: str, attributes: dict[str, Any]) -> int:
        """The sum of a counter's points (or a histogram's counts) whose attributes include ``attributes``."""
        total = 0
        for point in self.points(metric):
            if all(point.attributes.get(name) == value for name, value in attributes.items()):
                total += point.count if hasattr(point, "count") else point.value
        return total


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    instrumentor = AlmanetInstrumentor()
    instrumentor.instrument(tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider)
    try:
        yield telemetry
    finally:
        instrumentor.uninstrument()
        assert observer.current is None


class traced_denied(almanet.rpc_error):
    """The procedure's error, raised to its callers (a name of its own: other tests' ``denied`` is another class)."""


async def test_calls_and_invocations_are_spans_parent_and_child_with_their_metrics(
    telemetry: Telemetry, tcp: str, prefix: str
) -> None:
    service = almanet.new_service(tcp, prefix=prefix)

    @service.procedure
    async def greeting(payload: str) -> str:
        if payload == "guest":
            raise traced_denied("not you")
        return f"Hello, {payload}!"

    uri = f"{prefix}.greeting"
    async with service, almanet.new_session(tcp) as session:
        assert (await session.call(uri, "Aidar")).payload == "Hello, Aidar!"
        with pytest.raises(traced_denied):
            await session.call(uri, "guest")
        with pytest.raises(almanet.NoResponders):
            await session.call(f"{prefix}.nobody", "x", timeout=2)

    clients, servers = telemetry.finished(uri, SpanKind.CLIENT), telemetry.finished(uri, SpanKind.SERVER)
    assert len(clients) == len(servers) == 2
    for client, server in zip(clients, servers, strict=True):
        assert server.parent is not None and server.parent.span_id == client.context.span_id
        assert server.context.trace_id == client.context.trace_id
    ok_client, error_client = clients
    ok_server, error_server = servers
    host, port = tcp.rsplit(":", 1)
    assert dict(ok_client.attributes or {}) == {
        "rpc.system.name": "almanet",
        "rpc.method": uri,
        "almanet.call.kind": "call",
        "messaging.message.body.size": ok_client.attributes["messaging.message.body.size"],  # type: ignore[index]
        "server.address": host,
        "server.port": int(port),
        "rpc.response.status_code": "ok",
    }
    server_attributes = ok_server.attributes or {}
    assert server_attributes["messaging.consumer.group.name"] == "rpc"
    assert server_attributes["messaging.nsq.message.attempts"] == 1
    assert server_attributes["server.address"] == host
    assert len(str(server_attributes["messaging.message.id"])) == 16
    for span in (error_client, error_server):  # the rpc_error's name on both sides
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == "traced_denied"
    assert [event.attributes["exception.type"] for event in error_client.events] == ["traced_denied"]  # type: ignore[index]
    assert [event.attributes["exception.type"] for event in error_server.events] == ["traced_denied"]  # type: ignore[index]
    (nobody,) = telemetry.finished(f"{prefix}.nobody", SpanKind.CLIENT)
    assert (nobody.attributes or {})["error.type"] == "NoResponders"

    assert telemetry.count("rpc.client.call.duration", {"rpc.method": uri}) == 2
    assert telemetry.count("rpc.client.call.duration", {"rpc.method": uri, "error.type": "traced_denied"}) == 1
    assert telemetry.count("rpc.server.call.duration", {"rpc.method": uri, "rpc.response.status_code": "ok"}) == 1
    assert telemetry.count("almanet.rpc.client.no_responders", {"rpc.method": f"{prefix}.nobody"}) == 1
    assert telemetry.count("almanet.rpc.client.active_calls", {"rpc.method": uri}) == 0


async def test_a_call_a_procedure_makes_is_a_child_of_its_invocation_async_or_sync(
    telemetry: Telemetry, tcp: str, prefix: str
) -> None:
    service = almanet.new_service(tcp, prefix=prefix)
    inner_called = asyncio.Event()

    @service.procedure
    async def inner(payload: str) -> str:
        inner_called.set()
        return payload.upper()

    @service.procedure
    async def outer(payload: str, session: almanet.Session) -> str:
        return (await session.call(f"{prefix}.inner", payload)).payload  # type: ignore[no-any-return]

    @service.procedure
    def sync_outer(payload: str) -> str:  # in a thread of the pool: the context goes with it
        from opentelemetry import trace

        return f"{trace.get_current_span().get_span_context().span_id:x}"

    async with service, almanet.new_session(tcp) as session:
        assert (await session.call(f"{prefix}.outer", "a")).payload == "A"
        span_id = (await session.call(f"{prefix}.sync_outer", "b")).payload

    (outer_server,) = telemetry.finished(f"{prefix}.outer", SpanKind.SERVER)
    (inner_client,) = telemetry.finished(f"{prefix}.inner", SpanKind.CLIENT)
    (inner_server,) = telemetry.finished(f"{prefix}.inner", SpanKind.SERVER)
    assert inner_client.parent is not None and inner_client.parent.span_id == outer_server.context.span_id
    assert inner_server.parent is not None and inner_server.parent.span_id == inner_client.context.span_id
    assert {outer_server.context.trace_id, inner_server.context.trace_id} == {inner_client.context.trace_id}
    (sync_server,) = telemetry.finished(f"{prefix}.sync_outer", SpanKind.SERVER)
    assert span_id == f"{sync_server.context.span_id:x}"


async def test_multicall_delay_call_and_timeouts(telemetry: Telemetry, tcp: str, prefix: str) -> None:
    service = almanet.new_service(tcp, prefix=prefix)
    delayed = asyncio.Event()

    @service.procedure
    async def slow(payload: float) -> None:
        await asyncio.sleep(payload)

    @service.procedure
    async def later(payload: str) -> None:
        delayed.set()

    async with service, almanet.new_session(tcp) as session:
        assert len(await session.multicall(f"{prefix}.slow", 0.0, count=1)) == 1
        with pytest.raises(TimeoutError):
            await session.call(f"{prefix}.slow", 5.0, timeout=0.5)
        await session.delay_call(f"{prefix}.later", "x", 0.1)
        await asyncio.wait_for(delayed.wait(), 20)

    multicall, timed_out = telemetry.finished(f"{prefix}.slow", SpanKind.CLIENT)
    assert (multicall.attributes or {})["almanet.call.kind"] == "multicall"
    assert (multicall.attributes or {})["almanet.multicall.replies"] == 1
    assert (timed_out.attributes or {})["error.type"] == "CallTimeout"
    assert telemetry.count("almanet.rpc.client.timeouts", {"rpc.method": f"{prefix}.slow"}) == 1
    (deferred,) = telemetry.finished(f"{prefix}.later", SpanKind.CLIENT)
    assert (deferred.attributes or {})["almanet.call.kind"] == "delay_call"
    await eventually(lambda: telemetry.finished(f"{prefix}.later", SpanKind.SERVER))
    (run,) = telemetry.finished(f"{prefix}.later", SpanKind.SERVER)
    assert run.parent is not None and run.parent.span_id == deferred.context.span_id


async def test_a_consumed_message_is_a_child_of_its_produce(telemetry: Telemetry, session: almanet.Session) -> None:
    topic = f"test.{uuid.uuid4().hex[:16]}"
    await session.produce(topic, {"n": 1})
    await session.produce_batch(topic, [2, 3])
    await session.produce(topic, b"raw", raw=True)
    received = []
    async for message in session.consume(topic, "ch"):
        received.append(message)
        if message.body != b"raw" and message.payload == 2 and message.attempts == 1:
            message.rollback()  # delivered again: a redelivery
        else:
            message.commit()
        if len(received) == 5:
            break
    assert sorted(str(message.payload) for message in received if message.body != b"raw") == sorted(
        ["{'n': 1}", "2", "2", "3"]
    )
    assert next(message for message in received if message.body == b"raw").headers is None

    (single,) = telemetry.finished(f"publish {topic}", SpanKind.PRODUCER)[:1]
    batch = telemetry.finished(f"publish {topic}", SpanKind.PRODUCER)[1]
    assert (batch.attributes or {})["messaging.batch.message_count"] == 2
    processed = telemetry.finished(f"process {topic}", SpanKind.CONSUMER)
    assert len(processed) == 5
    parents = [span.parent.span_id if span.parent else None for span in processed]
    assert parents.count(single.context.span_id) == 1
    assert parents.count(batch.context.span_id) == 3  # 2, again, and 3
    assert parents.count(None) == 1  # the raw body carries no context
    assert sorted(str((span.attributes or {})["almanet.outcome"]) for span in processed) == [
        "commit",
        "commit",
        "commit",
        "commit",
        "rollback",
    ]
    assert telemetry.count("messaging.client.sent.messages", {"messaging.destination.name": topic}) == 4
    assert telemetry.count("messaging.client.consumed.messages", {"messaging.destination.name": topic}) == 5
    assert telemetry.count("almanet.redeliveries", {"messaging.destination.name": topic}) == 1


async def test_trace_produced_false_leaves_produced_bodies_as_they_are(session: almanet.Session) -> None:
    telemetry = Telemetry()
    instrumentor = AlmanetInstrumentor()
    instrumentor.instrument(tracer_provider=telemetry.tracer_provider, trace_produced=False)
    topic = f"test.{uuid.uuid4().hex[:16]}"
    try:
        await session.produce(topic, "plain")
    finally:
        instrumentor.uninstrument()
    async for message in session.consume(topic, "ch"):
        assert message.body == b"\xa5plain" and message.headers is None
        message.commit()
        break
    assert len(telemetry.finished(f"publish {topic}", SpanKind.PRODUCER)) == 1


async def test_an_invocation_without_a_trace_context_begins_a_trace_of_its_own(
    telemetry: Telemetry, tcp: str, prefix: str
) -> None:
    """Not a child of what was current where the service started, nor of the call before: a root."""
    from almanet.rpc import invocation_envelope

    service = almanet.new_service(tcp, prefix=prefix)

    @service.procedure
    async def echo(payload: str) -> str:
        return payload

    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("starting the service"):
        await service.start()
    try:
        async with almanet.new_session(tcp) as session:
            await session.call(f"{prefix}.echo", "traced")
            for headers in (None, {}, {"traceparent": 5}, {"traceparent": "nonsense", "tracestate": ["x"]}):
                body = invocation_envelope(0, None, 0, headers, "x")
                await session._producer.publish(f"{prefix}.echo", body)
            await eventually(lambda: len(telemetry.finished(f"{prefix}.echo", SpanKind.SERVER)) == 5)
    finally:
        await service.stop()
    traced, *untraced = telemetry.finished(f"{prefix}.echo", SpanKind.SERVER)
    assert traced.parent is not None
    assert [span.parent for span in untraced] == [None] * 4


async def test_the_callers_baggage_reaches_the_procedure(telemetry: Telemetry, tcp: str, prefix: str) -> None:
    from opentelemetry import baggage, context

    service = almanet.new_service(tcp, prefix=prefix)

    @service.procedure
    async def whose(payload: None) -> object:
        return baggage.get_baggage("user")

    async with service, almanet.new_session(tcp) as session:
        token = context.attach(baggage.set_baggage("user", "42"))
        try:
            assert (await session.call(f"{prefix}.whose", None)).payload == "42"
        finally:
            context.detach(token)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


async def test_an_error_that_cannot_be_printed_is_answered_and_its_spans_end(
    telemetry: Telemetry, tcp: str, prefix: str
) -> None:
    service = almanet.new_service(tcp, prefix=prefix)

    @service.procedure
    async def fails(payload: None) -> None:
        raise Unprintable()

    @service.procedure
    def fails_in_a_thread(payload: None) -> None:
        raise Unprintable()

    async with service, almanet.new_session(tcp) as session:
        for name in ("fails", "fails_in_a_thread"):
            with pytest.raises(almanet.InternalError):
                await session.call(f"{prefix}.{name}", None, timeout=5)
            (span,) = telemetry.finished(f"{prefix}.{name}", SpanKind.SERVER)
            assert (span.attributes or {})["error.type"] == "InternalError"
        assert not service._invoked


async def test_on_a_cluster_each_call_is_traced_through_the_nsqd_it_went_by(
    telemetry: Telemetry, almanet_cluster: Cluster, prefix: str
) -> None:
    """3 nsqd behind 2 nsqlookupd, the service on every nsqd (given nsqlookupd), a caller on each nsqd: every
    invocation's span is a child of its call's, and both name the caller's nsqd."""
    service = almanet.new_service(almanet_cluster.tcp(0), *almanet_cluster.lookupd_http, prefix=prefix)

    @service.procedure
    async def echo(payload: str) -> str:
        return payload

    nodes = [almanet_cluster.tcp(node) for node in range(len(almanet_cluster.nodes))]
    async with service:
        for node, address in enumerate(nodes):
            async with almanet.new_session(address) as session:
                assert (await session.call(f"{prefix}.echo", f"node {node}")).payload == f"node {node}"
    clients = telemetry.finished(f"{prefix}.echo", SpanKind.CLIENT)
    servers = {
        span.parent.span_id: span for span in telemetry.finished(f"{prefix}.echo", SpanKind.SERVER) if span.parent
    }
    assert len(clients) == len(servers) == len(nodes)
    for client, address in zip(clients, nodes, strict=True):
        server = servers[client.context.span_id]
        assert server.context.trace_id == client.context.trace_id
        host, port = address.rsplit(":", 1)
        for span in (client, server):
            attributes = span.attributes or {}
            assert (attributes["server.address"], attributes["server.port"]) == (host, int(port))


@pytest.mark.parametrize("kind", brokers_available())
async def test_a_connection_lost_and_open_again_is_a_reconnect(telemetry: Telemetry, kind: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    service = almanet.new_service(address, prefix="reconnects")

    @service.procedure
    async def echo(payload: str) -> str:
        return payload

    with broker_of_kind(kind, address):
        await service.start()
    try:
        await asyncio.sleep(0.5)  # gone: the service's connections reconnect until it is back
        with broker_of_kind(kind, address):
            host, port = address.rsplit(":", 1)
            counted = {"server.address": host, "server.port": int(port)}
            await eventually(lambda: telemetry.count("almanet.nsq.reconnects", counted) >= 2)  # procedure, discovery
    finally:
        await service.stop(timeout=1)


def test_no_op_providers_install_no_observer() -> None:
    """As with OTEL_SDK_DISABLED: almanet's calls then pay for nothing."""
    from opentelemetry import metrics, trace

    instrumentor = AlmanetInstrumentor()
    instrumentor.instrument(tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider())
    try:
        assert observer.current is None
    finally:
        instrumentor.uninstrument()


def test_instrumenting_before_anything_is_set_up_installs_nothing_and_says_so() -> None:
    """opentelemetry-instrument without an SDK, or instrument() before the providers: nothing is installed."""
    code = (
        "import logging; logging.basicConfig()\n"
        "from almanet import observer\n"
        "from almanet.otel import AlmanetInstrumentor\n"
        "AlmanetInstrumentor().instrument()\n"
        "print(observer.current)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout == "None\n"
    assert "almanet is not instrumented: OpenTelemetry has no tracer provider or meter provider" in done.stderr


def test_importing_almanet_imports_no_opentelemetry() -> None:
    code = "import sys, almanet, almanet.cli; almanet.new_service('127.0.0.1:4150'); print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "opentelemetry" not in done.stdout


# --- across processes ----------------------------------------------------------------------------------------

# Service B: set up in code, its spans in OpenTelemetry's in-memory exporter, written to SPANS_FILE as it stops.
SERVICE_B = """
import atexit, json, os

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import almanet
from almanet.otel import AlmanetInstrumentor

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
AlmanetInstrumentor().instrument(tracer_provider=provider)


@atexit.register
def write_spans():
    spans = [json.loads(span.to_json()) for span in exporter.get_finished_spans()]
    with open(os.environ["SPANS_FILE"], "w") as file:
        json.dump(spans, file)


service = almanet.new_service(os.environ["NSQD"], prefix=os.environ["PREFIX"] + ".b")


@service.procedure
async def lookup(payload: str) -> str:
    return payload.upper()
"""

# Service A: no OpenTelemetry in its code; `opentelemetry-instrument` sets it up, spans to the console.
SERVICE_A = """
import os

import almanet

service = almanet.new_service(os.environ["NSQD"], prefix=os.environ["PREFIX"] + ".a")


@service.procedure
async def greeting(payload: str, session: almanet.Session) -> str:
    found = await session.call(os.environ["PREFIX"] + ".b.lookup", payload)
    return f"Hello, {found.payload}!"
"""


def spans_printed(output: str) -> list[dict[str, Any]]:
    """The spans OpenTelemetry's console exporter printed: JSON objects one after the other."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := output.find("{", at)) >= 0:
        span, at = decoder.raw_decode(output, at)
        spans.append(span)
    return spans


def test_one_trace_from_a_caller_through_two_services_in_two_processes(
    telemetry: Telemetry, tcp: str, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "service_a.py").write_text(textwrap.dedent(SERVICE_A))
    (tmp_path / "service_b.py").write_text(textwrap.dedent(SERVICE_B))
    environment = {
        **os.environ,
        "NSQD": tcp,
        "PREFIX": prefix,
        "SPANS_FILE": str(tmp_path / "b.json"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PROJECT)]),
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "service-a",
    }
    almanet_serve = [sys.executable, "-m", "almanet", "serve"]
    instrument = str(Path(sys.executable).parent / "opentelemetry-instrument")
    b = subprocess.Popen([*almanet_serve, "service_b:service"], cwd=tmp_path, env=environment, text=True)
    a = subprocess.Popen(
        [instrument, *almanet_serve, "service_a:service"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_served(tcp, f"{prefix}.b.lookup")
        wait_until_served(tcp, f"{prefix}.a.greeting")

        async def call() -> None:
            async with almanet.new_session(tcp) as session:
                assert (await session.call(f"{prefix}.a.greeting", "Aidar")).payload == "Hello, AIDAR!"

        telemetry.spans.clear()
        asyncio.run(call())
    finally:
        for process in (a, b):
            process.send_signal(signal.SIGTERM)
        printed, _ = a.communicate(timeout=60)
        assert b.wait(60) == 0 and a.returncode == 0
    (caller,) = telemetry.finished(f"{prefix}.a.greeting", SpanKind.CLIENT)
    trace_id = f"0x{caller.context.trace_id:032x}"
    in_a = [span for span in spans_printed(printed) if span["context"]["trace_id"] == trace_id]
    in_b = [span for span in json.loads((tmp_path / "b.json").read_text()) if span["context"]["trace_id"] == trace_id]
    a_server = next(span for span in in_a if span["kind"] == "SpanKind.SERVER")
    a_client = next(span for span in in_a if span["kind"] == "SpanKind.CLIENT")
    (b_server,) = in_b
    assert a_server["name"] == f"{prefix}.a.greeting"
    assert a_server["parent_id"] == f"0x{caller.context.span_id:016x}"
    assert a_client["name"] == f"{prefix}.b.lookup" and a_client["parent_id"] == a_server["context"]["span_id"]
    assert b_server["name"] == f"{prefix}.b.lookup" and b_server["parent_id"] == a_client["context"]["span_id"]
    assert a_server["resource"]["attributes"]["service.name"] == "service-a"


def test_the_observability_page_runs_as_written(tcp: str, tmp_path: Path) -> None:
    """Its example, on the test's broker: the call's result, then its two spans in one trace, then the metrics."""
    (code,) = re.findall(r"^```python\n(.*?)^```", (PROJECT / "docs" / "OBSERVABILITY.md").read_text(), re.M | re.S)
    (tmp_path / "example.py").write_text(code.replace("127.0.0.1:4150", tcp))
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.startswith("Hello, Aidar!\n")
    printed = spans_printed(done.stdout.split("\n", 1)[1])
    spans = [span for span in printed if span.get("name") == "net.example.greeting"]
    assert sorted(span["kind"] for span in spans) == ["SpanKind.CLIENT", "SpanKind.SERVER"]
    assert len({span["context"]["trace_id"] for span in spans}) == 1
    assert "rpc.client.call.duration" in done.stdout and "rpc.server.call.duration" in done.stdout
