"""Benchmark processes: ``python -m almanet.bench.workers ROLE SYSTEM ADDRESS NAME [...]``.

- ``serve SYSTEM ADDRESS NAME``: almanet's service (procedure ``NAME.echo``),
  the ansq baseline's (topic ``NAME``) or a NATS responder (subject ``NAME``),
  each answering with the payload it is given; prints ``ready`` once
  subscribed, serves until SIGTERM or SIGINT. almanet's takes several
  addresses, comma-separated (nsqd's, nsqlookupd's ``http://host:port``).
- ``measure SYSTEM ADDRESS NAME WORKLOAD COUNT WINDOW SIZE [marked]``: one
  workload of ``workloads.MEASURES``; prints its figures as one JSON line.
  With ``marked``, at each of the workload's marks it prints ``mark`` and
  waits for a line (``measure()`` reads CPU times meanwhile); without, the
  marks are nothing.
- ``load ADDRESS NAME COUNT WINDOW SIZE``: one of the almanet callers of
  ``rpc_under_load``: prints ``warm`` after its warm-up, starts its calls when
  it reads a line, then prints when they started and ended as one JSON line;
  once its stdin is closed, their latencies as another, and it leaves.

``ALMANET_BENCH_LOOP=uvloop`` runs the process on uvloop. ``ALMANET_BENCH_OTEL=RATIO``
instruments almanet in it with OpenTelemetry's SDK, sampling that share of the
traces (1: every call; ``traced``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from almanet import loops
from almanet.bench import workloads
from almanet.bench.processes import cpu_seconds, stop, wait_for_line

MARK = "mark"  # what a measure process prints at each of its workload's marks
MEASURE_TIMEOUT = 600.0  # seconds a measure process may take


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on the loop ALMANET_BENCH_LOOP names (asyncio by default)."""
    return loops.run(main, "uvloop" if os.environ.get("ALMANET_BENCH_LOOP") == "uvloop" else "asyncio")


async def _serve(system: str, address: str, name: str) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    if system == "almanet":
        import almanet

        service = almanet.new_service(*address.split(","), prefix=name)

        @service.procedure
        async def echo(payload: Any) -> Any:
            return payload

        async with service:
            print("ready", flush=True)
            await stopping.wait()
    elif system == "nats":
        import nats

        client = await nats.connect(f"nats://{address}")

        async def respond(message: Any) -> None:
            await message.respond(message.data)

        await client.subscribe(name, cb=respond)
        await client.flush()
        print("ready", flush=True)
        await stopping.wait()
        await client.close()
    else:
        from almanet.bench import baseline

        ready = asyncio.Event()
        serving = asyncio.ensure_future(baseline.serve(address, name, ready, stopping))
        await ready.wait()
        print("ready", flush=True)
        await serving


async def _told(word: str) -> None:
    """Print ``word``, then wait until a line is read from stdin."""
    print(word, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _unmarked() -> None:
    pass


async def _measure(
    system: str, workload: str, address: str, name: str, count: int, window: int, size: int, marked: bool
) -> None:
    mark = partial(_told, MARK) if marked else _unmarked
    figures = await workloads.MEASURES[system, workload](address, name, count, window, size, mark)
    print(json.dumps(figures), flush=True)


async def _load(address: str, name: str, count: int, window: int, size: int) -> None:
    loop = asyncio.get_running_loop()

    async def report(figures: dict[str, Any]) -> None:
        latencies = figures.pop("latencies_us")
        print(json.dumps(figures), flush=True)
        # Encoding the latencies is no part of the calls: it waits until every CPU time is read (stdin is closed).
        await loop.run_in_executor(None, sys.stdin.read)
        print(json.dumps(latencies), flush=True)

    await workloads.almanet_rpc_under_load(address, name, count, window, size, partial(_told, "warm"), report)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "almanet.bench.workers", *args]


@contextmanager
def service_process(
    system: str, address: str, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """The system's service running and subscribed; stopped on exit."""
    process = subprocess.Popen(_command("serve", system, address, name), stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        wait_for_line(process, process.stdout, lambda line: line.strip() == "ready")
        yield process
    finally:
        stop(process)


def measure(
    system: str,
    address: str,
    name: str,
    workload: str,
    count: int,
    window: int,
    size: int,
    env: dict[str, str] | None = None,
    watched: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Run one workload in a client process of its own; its figures, and ``cpu_s``.

    At each of the workload's marks (``workloads``: where its measured calls
    start and end) the process waits while the CPU time of the ``watched``
    processes (pid by name) is read, as ``rpc_under_load`` reads it. ``cpu_s``
    has one entry per span between two marks (none for a workload without
    marks): each watched process's CPU seconds in it, by name (empty where
    nothing is watched). Every workload, whatever the system, runs so.
    """
    command = _command("measure", system, address, name, workload, str(count), str(window), str(size), "marked")
    readings, lines = [], []
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) as process:
        timer = threading.Timer(MEASURE_TIMEOUT, process.kill)
        timer.start()
        try:
            assert process.stdin is not None and process.stdout is not None
            for line in process.stdout:
                if line.strip() != MARK:
                    lines.append(line)
                    continue
                readings.append(_cpu_seconds(watched or {}))
                process.stdin.write("go\n")
                process.stdin.flush()
            status = process.wait()
        finally:
            timer.cancel()
            stop(process)
    if status != 0 or not lines:
        why = f"not done within {MEASURE_TIMEOUT:g} s" if status == -signal.SIGKILL else f"exit status {status}"
        raise RuntimeError(f"{command!r} failed ({why})")
    figures: dict[str, Any] = json.loads(lines[-1])
    figures["cpu_s"] = [_spent(before, after) for before, after in itertools.pairwise(readings)]
    return figures


def rpc_under_load(
    addresses: Sequence[str],
    name: str,
    count: int,
    window: int,
    size: int,
    watched: Mapping[str, int],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Calls to ``name``'s echo from one almanet caller process per address, all at once, ``count`` each.

    The measured window holds the calls only: every caller warms up, then
    waits; the CPU time of the callers and of the ``watched`` processes (pid
    by name) is read, every caller told to go, and it is read again once each
    has said when its calls started and ended, before any prints their
    latencies or leaves its session. Figures: ``calls`` (all the callers'),
    ``seconds`` (from the first caller's start to the last one's end),
    ``latencies_us`` (every call's) and ``cpu_s``, by name: each watched
    process's, and ``callers``, their sum.
    """
    callers = [
        subprocess.Popen(_command("load", address, name, str(count), str(window), str(size)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for address in addresses
    ]  # fmt: skip
    try:
        for caller in callers:
            assert caller.stdout is not None
            wait_for_line(caller, caller.stdout, lambda line: line.strip() == "warm")
        before = _cpu_seconds(watched, callers)
        for caller in callers:
            assert caller.stdin is not None
            caller.stdin.write("go\n")
            caller.stdin.flush()
        spans = [_json_line(caller) for caller in callers]  # when each one's calls started and ended
        after = _cpu_seconds(watched, callers)
        for caller in callers:
            assert caller.stdin is not None
            caller.stdin.close()
        latencies = [latency for caller in callers for latency in _json_line(caller)]
        for caller in callers:
            if caller.wait(timeout=30) != 0:
                raise RuntimeError(f"{caller.args!r} failed")
    finally:
        for caller in callers:
            stop(caller)
    return {
        "calls": count * len(callers),
        "seconds": max(span["ended"] for span in spans) - min(span["started"] for span in spans),
        "latencies_us": latencies,
        "cpu_s": _spent(before, after),
    }


def _cpu_seconds(watched: Mapping[str, int], callers: Sequence[subprocess.Popen[str]] = ()) -> dict[str, float]:
    """The CPU time of each watched process (pid by name), and, when there are callers, of them together."""
    used = {name: cpu_seconds(pid) for name, pid in watched.items()}
    if callers:
        used["callers"] = sum(cpu_seconds(caller.pid) for caller in callers)
    return used


def _spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Each process's CPU seconds from one reading of ``_cpu_seconds`` to the next."""
    return {process: after[process] - before[process] for process in before}


def _json_line(caller: subprocess.Popen[str]) -> Any:
    assert caller.stdout is not None
    line = caller.stdout.readline()
    if not line:
        raise RuntimeError(f"{caller.args!r} ended before it printed its figures")
    return json.loads(line)


def traced(ratio: float) -> None:
    """almanet traced through OpenTelemetry's SDK, as an application would: ``ratio`` of the traces sampled
    (the others' spans not recorded) and exported (by the SDK's batch processor, to an exporter that drops
    them), metrics read every 10 s (and dropped)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from almanet.otel import AlmanetInstrumentor

    class DroppedSpans(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class DroppedMetrics(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 0, **kwargs: Any) -> MetricExportResult:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kwargs: Any) -> None:
            pass

    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    tracer_provider.add_span_processor(BatchSpanProcessor(DroppedSpans()))
    meter_provider = MeterProvider([PeriodicExportingMetricReader(DroppedMetrics(), 10_000)])
    AlmanetInstrumentor().instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)


def main(argv: list[str]) -> None:
    role, *args = argv
    if os.environ.get("ALMANET_BENCH_OTEL"):
        traced(float(os.environ["ALMANET_BENCH_OTEL"]))
    if role == "load":
        address, name, count, window, size = args
        run_loop(_load(address, name, int(count), int(window), int(size)))
        return
    system, address, name, *workload = args
    if role == "serve":
        run_loop(_serve(system, address, name))
    else:
        kind, count, window, size, *marked = workload
        run_loop(_measure(system, kind, address, name, int(count), int(window), int(size), marked == ["marked"]))


if __name__ == "__main__":
    main(sys.argv[1:])
