"""``almanet bench``: almanet end to end, side by side with NATS request/reply and the ansq RPC baseline.

It starts the broker (the embedded one, or uses the nsqd it is given) and,
when ``nats-server`` and nats-py are installed, a nats-server on a free
loopback port. Each workload runs its service and its client in processes of
their own (``workers``); every figure in the table is measured in this run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from almanet.bench.workers import measure, service_process, stop, wait_for_line


@dataclasses.dataclass(frozen=True)
class Settings:
    nsqd: str | None  # host:port of an external nsqd; None starts the embedded broker
    loop: str  # asyncio or uvloop
    pure: bool  # ALMANET_NO_EXTENSIONS for every almanet process
    scale: float  # multiplies every message count


@dataclasses.dataclass
class Row:
    workload: str
    unit: str
    target: str = ""  # what almanet's ratio to NATS (or to the baseline) should be
    almanet: float | None = None
    nats: float | None = None
    baseline: float | None = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def embedded_broker(env: dict[str, str]) -> Iterator[str]:
    """``almanet broker`` on a free port, with room for every workload's messages in memory (nsqd uses disk)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0",
         "--mem-queue-size=10000000"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        listening = wait_for_line(process, process.stderr, lambda line: "TCP: listening on" in line)
        # Its log goes on being read, so that it never blocks writing it.
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield listening.rsplit(" ", 1)[1].strip()
    finally:
        stop(process)


@contextlib.contextmanager
def nats_server() -> Iterator[str | None]:
    """A nats-server on a free loopback port, or None when nats-server or nats-py is missing."""
    executable = shutil.which("nats-server")
    try:
        importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        executable = None
    if executable is None:
        yield None
        return
    port = _free_port()
    process = subprocess.Popen([executable, "-a", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        stop(process)


def run(settings: Settings) -> str:
    """Measure every workload; the table as text."""
    compiled_env = dict(os.environ, ALMANET_BENCH_LOOP=settings.loop)
    compiled_env.pop("ALMANET_NO_EXTENSIONS", None)
    pure_env = dict(compiled_env, ALMANET_NO_EXTENSIONS="1")
    with contextlib.ExitStack() as stack:
        # The broker is not what --pure measures: it stays compiled.
        nsqd = settings.nsqd or stack.enter_context(embedded_broker(compiled_env))
        nats = stack.enter_context(nats_server())
        bench = _Bench(settings.scale, nsqd, nats, pure_env if settings.pure else compiled_env)
        rows = bench.rpc_latency() + bench.rpc_throughput()
        if not settings.pure:
            row = Row("RPC, 256 calls in flight, ALMANET_NO_EXTENSIONS", "calls/s")
            row.almanet = bench.rpc("almanet", 256, 20_000, pure_env, " (pure)")
            rows.append(row)
        rows += bench.publish_and_consume()
    return _table(rows, settings)


class _Bench:
    """The workloads of one run, each measured in processes of its own, with progress on stderr."""

    def __init__(self, scale: float, nsqd: str, nats: str | None, env: dict[str, str]) -> None:
        self.scale = scale
        self.address = {"almanet": nsqd, "baseline": nsqd, "nats": nats}
        self.systems = ["almanet", "nats", "baseline"] if nats else ["almanet", "baseline"]
        self.env = env
        self._names = itertools.count()
        self._live = sys.stderr.isatty()

    def _measure(self, label: str, system: str, workload: str, count: int, window: int, env: dict[str, str]) -> Any:
        count = max(100, int(count * self.scale))
        name = f"bench.{os.getpid()}.{next(self._names)}"
        address = self.address[system]
        assert address is not None
        sys.stderr.write(f"  {label} ..." + ("" if self._live else "\n"))
        sys.stderr.flush()
        started = time.monotonic()
        if workload == "rpc":
            with service_process(system, address, name, env):
                figures = measure(system, workload, address, name, count, window, env)
        else:
            figures = measure(system, workload, address, name, count, window, env)
        result: Any = figures.get("per_second", figures.get("latencies_us"))
        shown = _format(result) if isinstance(result, float) else f"p50 {_format(_percentile(result, 0.5))} µs"
        line = f"  {label}: {shown} ({time.monotonic() - started:.1f} s)"
        sys.stderr.write(("\r" + line + " " * 10 + "\n") if self._live else line + "\n")
        return result

    def rpc(self, system: str, window: int, count: int, env: dict[str, str] | None = None, note: str = "") -> float:
        label = f"RPC {window} in flight, {system}{note}"
        per_second: float = self._measure(label, system, "rpc", count, window, env or self.env)
        return per_second

    def rpc_latency(self) -> list[Row]:
        latencies = {
            system: self._measure(f"RPC sequential, {system}", system, "rpc", 2000, 1, self.env)
            for system in self.systems
        }
        rows = []
        for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            row = Row(f"RPC sequential latency {label}", "µs", target="<= 1.2x NATS" if label == "p50" else "")
            for system, values in latencies.items():
                setattr(row, system, _percentile(values, fraction))
            rows.append(row)
        return rows

    def rpc_throughput(self) -> list[Row]:
        rows = []
        for window in (64, 256):
            row = Row(
                f"RPC, {window} calls in flight", "calls/s", target=">= NATS, >= 10x baseline" if window == 256 else ""
            )
            for system in self.systems:
                setattr(row, system, self.rpc(system, window, 5000 if system == "baseline" else 20_000))
            rows.append(row)
        return rows

    def publish_and_consume(self) -> list[Row]:
        publish = Row("publish 200 B, produce() with 64 in flight", "msgs/s", target=">= NATS")
        batches = Row("publish 200 B, produce_batch() x200", "msgs/s")
        consume = Row("consume 200 B, commit each (NATS: core subscription)", "msgs/s", target=">= 1/2 NATS")
        for system in self.systems:
            if system == "baseline":
                continue
            setattr(publish, system, self._measure(f"publish, {system}", system, "publish", 100_000, 64, self.env))
            setattr(consume, system, self._measure(f"consume, {system}", system, "consume", 100_000, 2500, self.env))
        batches.almanet = self._measure("publish batches, almanet", "almanet", "publish", 100_000, 0, self.env)
        return [publish, batches, consume]


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ratio(row: Row, other: float | None) -> str:
    if row.almanet is None or other is None:
        return "-"
    return f"{row.almanet / other:.2f}x"


def _table(rows: list[Row], settings: Settings) -> str:
    header = ["workload", "unit", "almanet", "NATS", "almanet/NATS", "baseline", "almanet/baseline", "target"]
    cells = [header] + [
        [row.workload, row.unit, _format(row.almanet), _format(row.nats), _ratio(row, row.nats),
         _format(row.baseline), _ratio(row, row.baseline), row.target]
        for row in rows
    ]  # fmt: skip
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) if column < 2 else cell.rjust(width) for column, (cell, width) in enumerate(
            zip(line, widths, strict=True)))
        for line in cells
    ]  # fmt: skip
    text.insert(1, "  ".join("-" * width for width in widths))
    compiled = next((row.almanet for row in rows if row.workload == "RPC, 256 calls in flight"), None)
    pure = next((row.almanet for row in rows if "NO_EXTENSIONS" in row.workload), None)
    if compiled and pure:
        text.append(f"\ncompiled / ALMANET_NO_EXTENSIONS, RPC with 256 in flight: {compiled / pure:.2f}x")
    text.append("Ratios are almanet's figure over the other's: for latency below 1 is faster, else above 1.")
    if not any(row.nats for row in rows):
        text.append("NATS: not measured (it needs nats-server on PATH, Debian package nats-server, and nats-py).")
    text.append("\n" + _machine(settings))
    return "\n".join(text)


def _machine(settings: Settings) -> str:
    import almanet

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    versions = [f"almanet {almanet.__version__}"]
    for package in ("nats-py", "ansq", "msgpack", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    nats_server_version = ""
    if shutil.which("nats-server"):
        nats_server_version = subprocess.run(
            ["nats-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    broker = f"nsqd at {settings.nsqd}" if settings.nsqd else "almanet's embedded broker"
    speedups = "ALMANET_NO_EXTENSIONS (pure)" if settings.pure else f"compiled {almanet.speedups()}"
    return "\n".join(
        [
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            f"python: {platform.python_implementation()} {platform.python_version()}, loop {settings.loop}",
            f"broker: {broker}; {nats_server_version or 'no nats-server'}",
            f"almanet: {speedups}",
            "versions: " + ", ".join(versions),
        ]
    )
