"""``almanet bench``: almanet end to end on the embedded broker and on nsqd, beside NATS and NSQ's Go clients.

It starts almanet's embedded broker, nsqd when it finds it (``ALMANET_NSQD``,
else ``nsqd`` on ``PATH``; or it uses the running one ``--nsqd`` names) and,
when nats-server and nats-py are installed, a nats-server with JetStream, each
on free loopback ports. Every workload runs its service and its client in
processes of their own (``workers``), ``rounds`` times, the brokers taking
turns within a round, so that a machine whose speed drifts shifts them all
alike; the table gives the median round (latency percentiles: of all rounds'
calls). Its column NSQD_CPU gives, for every RPC row, nsqd's CPU time per
call while that workload's calls ran on it, read from /proc at the workload's
marks (``workers.measure``); it needs the pid of an nsqd the bench started.
NSQ's Go clients (``go_clients``) measure what each broker gives a client that
costs next to nothing. Every figure is measured in this run.

Where nsqd and nsqlookupd are both found, a second table (the cluster
section, alone with ``only``) gives RPC from 3 callers at once on one nsqd
and on a cluster of 3 nsqd and 2 nsqlookupd, taking turns within a round:
throughput, p50 latency, and the CPU time per call of the callers, the
service and nsqd, read from /proc over the calls only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from almanet.bench import brokers
from almanet.bench.go_clients import GoClients, find_go_clients
from almanet.bench.workers import measure, rpc_under_load, service_process
from almanet.bench.workloads import STRESS_CALLS
from almanet.broker.nsqd import Cluster, find_nsqd, find_nsqlookupd

# The table's columns of figures: almanet on each broker, then the NATS peers.
EMBEDDED, NSQD, NATS, JETSTREAM = "embedded", "nsqd", "NATS", "JetStream"
NSQD_CPU = "nsqd CPU µs/call"  # the column of nsqd's CPU time per call, on the RPC rows
PAYLOADS = {7: "7 B", 1024: "1 KiB"}  # RPC payload sizes
RPC_WINDOW = 256  # calls in flight
MESSAGE_SIZE = 200  # bytes of every produced and consumed message
PUBLISH_WINDOW = 64  # produce() and JetStream publishes in flight
GO_BATCH = 200  # bench_writer's MPUB size, as produce_batch()'s
CONSUME_WINDOW = 2500  # most messages in flight to a consumer: bench_reader's RDY, almanet's max_in_flight
# Messages (or calls) per round at --scale 1: each workload takes a second or two on a 2-core machine.
COUNTS = {
    "rpc sequential": 2_000,
    "rpc in flight": 40_000,
    "rpc under load": 40_000,  # each caller's, in the cluster section
    "produce": 200_000,
    "produce_batch": 400_000,
    "consume": 400_000,
    "jetstream publish": 30_000,
    "jetstream consume": 50_000,
}
GO_WRITER_SECONDS = 2.0
GO_READER_SECONDS = 1.5  # shorter than the writer's run, so that the reader does not run out of messages
WITHIN = 1.5  # the embedded broker's figures should be within this factor of nsqd's
# The cluster section (--only cluster): CALLERS callers at once on one nsqd, then on a cluster of CLUSTER_NODES.
CLUSTER_SECTION = "cluster"
CLUSTER_NODES, CLUSTER_LOOKUPDS = 3, 2
CALLERS = 3  # one on each nsqd of the cluster
CALL_SIZE = 7  # bytes of each call's payload
ONE_NSQD, CLUSTER = "1 nsqd", f"{CLUSTER_NODES}-nsqd cluster"  # its rows
CLUSTER_TITLE = f"RPC on a {CLUSTER_NODES}-nsqd cluster beside one nsqd"
# Its figures, by the key _rpc_under_load gives each.
CLUSTER_FIGURES = {
    "per_second": "cluster calls/s",
    "p50_us": "cluster p50",
    "callers_cpu_us": "cluster callers CPU",
    "service_cpu_us": "cluster service CPU",
    "nsqd_cpu_us": "cluster nsqd CPU",
}
NSQD_CPU_BY_NODE = "cluster nsqd CPU by node"


@dataclasses.dataclass(frozen=True)
class Settings:
    nsqd: str | None  # host:port of a running nsqd; None starts one when it is found
    nsqd_http: str | None  # that nsqd's HTTP host:port; None: its TCP port + 1
    loop: str  # asyncio or uvloop
    pure: bool  # ALMANET_NO_EXTENSIONS for every almanet process
    scale: float  # multiplies every message count and the Go clients' run time
    rounds: int  # each workload is measured this many times
    only: str | None  # CLUSTER_SECTION: that section alone; None: every workload


@dataclasses.dataclass(frozen=True)
class Target:
    """What almanet's figure must be: at most or at least ``bound``, times ``reference``'s figure if any."""

    bound: float
    at_most: bool  # latencies and durations: at most; throughputs: at least
    reference: str = ""  # NATS (same row), bench_writer or bench_reader (their rows, same broker); "": absolute

    def __str__(self) -> str:
        if self.reference:
            return f"{'<=' if self.at_most else '>='} {self.bound:.1f}x {self.reference}"
        return f"< {self.bound:g} s"


@dataclasses.dataclass(frozen=True)
class Row:
    workload: str
    unit: str
    figure: str  # the measured figure the row shows
    percentile: float | None = None  # of the figure's latencies; None: the median round
    target: Target | None = None
    rpc: bool = False  # its workload is calls: NSQD_CPU shows nsqd's CPU per call in it (figure _cpu(figure))


def rows(pure: bool) -> list[Row]:
    """The table's rows; ``pure`` (every almanet process without extensions) leaves out the pure-only row."""
    table = []
    for size, shown in PAYLOADS.items():
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            target = Target(1.0, at_most=True, reference=NATS) if name == "p50" else None
            table.append(
                Row(f"RPC sequential {name}, {shown}", "µs", f"rpc sequential {size}", fraction, target, rpc=True)
            )
    for size, shown in PAYLOADS.items():
        table.append(
            Row(f"RPC, {RPC_WINDOW} calls in flight, {shown}", "calls/s", f"rpc in flight {size}",
                target=Target(2.0, at_most=False, reference=NATS), rpc=True)
        )  # fmt: skip
    if not pure:
        table.append(
            Row(f"RPC, {RPC_WINDOW} in flight, 7 B, ALMANET_NO_EXTENSIONS", "calls/s", "rpc in flight pure", rpc=True)
        )
    table += [
        Row(f"{STRESS_CALLS} sequential calls, total", "s", "stress sequential", target=Target(1.0, at_most=True),
            rpc=True),
        Row(f"{STRESS_CALLS} concurrent calls, total", "s", "stress concurrent", target=Target(1.0, at_most=True),
            rpc=True),
        Row(f"produce() {MESSAGE_SIZE} B, {PUBLISH_WINDOW} in flight (JetStream: acked publish)", "msgs/s",
            "produce", target=Target(0.5, at_most=False, reference="bench_writer")),
        Row(f"produce_batch() {MESSAGE_SIZE} B, x{GO_BATCH}", "msgs/s", "produce_batch"),
        Row(f"NSQ Go bench_writer, MPUB x{GO_BATCH}", "msgs/s", "bench_writer"),
        Row(f"consume {MESSAGE_SIZE} B, commit each (JetStream: pull, ack each)", "msgs/s", "consume",
            target=Target(0.5, at_most=False, reference="bench_reader")),
        Row(f"NSQ Go bench_reader, RDY {CONSUME_WINDOW}, FIN each", "msgs/s", "bench_reader"),
    ]  # fmt: skip
    return table


def _cpu(figure: str) -> str:
    """The figure of nsqd's CPU µs per call in the calls of ``figure``'s workload (column NSQD)."""
    return f"{figure}, nsqd CPU"


@dataclasses.dataclass(frozen=True)
class _Server:
    """A service the RPC workloads call: on a broker's ``column`` (or NATS), through ``system``'s client."""

    column: str
    system: str
    address: str
    name: str
    watched: dict[str, int]  # pid by name of the processes whose CPU time is read: nsqd's, when the bench started it


def run(settings: Settings) -> str:
    """Measure every workload (``only``: those of one section); the tables as text."""
    load_before = os.getloadavg()[0]  # other work on the machine moves the figures
    compiled_env = dict(os.environ, ALMANET_BENCH_LOOP=settings.loop)
    compiled_env.pop("ALMANET_NO_EXTENSIONS", None)
    pure_env = dict(compiled_env, ALMANET_NO_EXTENSIONS="1")
    nsqd_executable = None if settings.nsqd else find_nsqd()
    nsqlookupd_executable = find_nsqlookupd() if nsqd_executable else None
    bench = _Bench(settings, pure_env if settings.pure else compiled_env, pure_env)
    tables = []
    running: list[brokers.Broker] = []
    nats, go_clients = None, None
    if settings.only != CLUSTER_SECTION:
        with contextlib.ExitStack() as stack:
            # The brokers are not what --pure measures: the embedded one stays compiled.
            running.append(stack.enter_context(brokers.embedded_broker(compiled_env)))
            if settings.nsqd:
                running.append(brokers.running_nsqd(settings.nsqd, settings.nsqd_http))
            elif nsqd_executable:
                running.append(stack.enter_context(brokers.nsqd(nsqd_executable)))
            nats = stack.enter_context(brokers.nats_server()) if brokers.nats_available() else None
            go_clients = find_go_clients(nsqd_executable)
            bench.rpc(running, nats)
            bench.publish_and_consume(running, nats, go_clients)
            for broker in running:
                broker.delete_topics(brokers.name_prefix())  # on an nsqd that runs on, none of the bench's is left
        tables.append(_table(rows(settings.pure), bench.samples, bench.nsqd_cpu_note(running)))
        if not settings.nsqd and not nsqd_executable:
            bench.notes.append("nsqd: not found (set ALMANET_NSQD, put nsqd on PATH or give --nsqd host:port).")
        if not nats:
            bench.notes.append(
                "NATS: not measured (it needs nats-server on PATH, Debian package nats-server, and nats-py)."
            )
        if not go_clients:
            bench.notes.append("NSQ Go clients: not found (ALMANET_NSQ_BENCH, beside nsqd or on PATH).")
    if nsqd_executable and nsqlookupd_executable:
        bench.cluster(nsqd_executable, nsqlookupd_executable)
        tables.append(_cluster_table(bench.samples))
    elif settings.nsqd:
        bench.notes.append(f"{CLUSTER_TITLE}: not measured (it starts nsqd of its own, not --nsqd's).")
    else:
        bench.notes.append(
            f"{CLUSTER_TITLE}: not measured (it needs nsqd and nsqlookupd: ALMANET_NSQD and ALMANET_NSQLOOKUPD, "
            "or on PATH; nsqlookupd also beside nsqd)."
        )
    machine = _machine(settings, running, nats is not None, nsqd_executable, nsqlookupd_executable, go_clients,
                       load_before)  # fmt: skip
    return "\n\n".join([*tables, *(["\n".join(bench.notes)] if bench.notes else []), machine])


class _Bench:
    """The workloads of one run, with progress on stderr; ``samples`` collects the figures of every round."""

    def __init__(self, settings: Settings, env: dict[str, str], pure_env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.pure_env = pure_env
        self.samples: dict[tuple[str, str], list[Any]] = {}  # (figure, column): one entry per round
        self.notes: list[str] = []
        self._names = itertools.count()
        self._round = 0
        self._live = sys.stderr.isatty()

    def _name(self, kind: str) -> str:
        """A name of its own for a service, or a NATS subject."""
        return f"{brokers.name_prefix()}{kind}{next(self._names)}"

    def _count(self, workload: str) -> int:
        return max(100, int(COUNTS[workload] * self.settings.scale))

    def _seconds(self, seconds: float) -> float:
        return max(0.2, seconds * self.settings.scale)

    def _rounds(self) -> Iterator[int]:
        for number in range(self.settings.rounds):
            self._round = number
            yield number

    def _record(self, column: str, label: str, measured: Callable[[], dict[str, Any]], **figures: str) -> None:
        """Run ``measured``, with a progress line; keep what it returns under each key as the figure named."""
        label = f"  round {self._round + 1}/{self.settings.rounds}, {label}, {column}"
        sys.stderr.write(f"{label} ..." + ("" if self._live else "\n"))
        sys.stderr.flush()
        started = time.monotonic()
        results = measured()
        for key, figure in figures.items():
            self.samples.setdefault((figure, column), []).append(results[key])
        first = results[next(iter(figures))]
        shown = f"p50 {_format(_percentile(first, 0.5))} µs" if isinstance(first, list) else _format(first)
        line = f"{label}: {shown} ({time.monotonic() - started:.1f} s)"
        sys.stderr.write(("\r" + line + " " * 10 + "\n") if self._live else line + "\n")

    def rpc(self, running: list[brokers.Broker], nats: str | None) -> None:
        """RPC on every broker and on NATS: one service each (and one without extensions), serving every round.

        Every workload runs in the same harness whatever the system; on nsqd,
        when the bench started it, nsqd's CPU time is read around its calls.
        """
        servers: list[_Server] = []
        pure_servers: list[_Server] = []
        with contextlib.ExitStack() as services:
            for broker in running:
                watched = {NSQD: broker.pid} if broker.name == NSQD and broker.pid is not None else {}
                servers.append(_Server(broker.name, "almanet", broker.tcp_address, self._name("rpc"), watched))
                if not self.settings.pure:
                    pure_servers.append(_Server(broker.name, "almanet", broker.tcp_address, self._name("rpc"), watched))
            if nats:
                servers.append(_Server(NATS, "nats", nats, self._name("rpc"), {}))
            for env, started in ((self.env, servers), (self.pure_env, pure_servers)):
                for server in started:
                    services.enter_context(service_process(server.system, server.address, server.name, env))
            for _ in self._rounds():
                for size, shown in PAYLOADS.items():
                    for server in servers:
                        self._rpc(server, f"RPC sequential {shown}", "rpc", self._count("rpc sequential"), 1, size,
                                  self.env, latencies_us=f"rpc sequential {size}")  # fmt: skip
                for size, shown in PAYLOADS.items():
                    for server in servers:
                        self._rpc(server, f"RPC {RPC_WINDOW} in flight {shown}", "rpc", self._count("rpc in flight"),
                                  RPC_WINDOW, size, self.env, per_second=f"rpc in flight {size}")  # fmt: skip
                for server in pure_servers:
                    self._rpc(server, f"RPC {RPC_WINDOW} in flight 7 B, ALMANET_NO_EXTENSIONS", "rpc",
                              self._count("rpc in flight"), RPC_WINDOW, 7, self.pure_env,
                              per_second="rpc in flight pure")  # fmt: skip
                for server in servers:
                    self._rpc(server, f"{STRESS_CALLS} sequential calls, then concurrent, seconds", "stress",
                              STRESS_CALLS, 1, 7, self.env, sequential_s="stress sequential",
                              concurrent_s="stress concurrent")  # fmt: skip

    def _rpc(
        self,
        server: _Server,
        label: str,
        workload: str,
        count: int,
        window: int,
        size: int,
        env: dict[str, str],
        **figures: str,
    ) -> None:
        """Record an RPC workload of ``count`` calls per span (``workloads``: between two marks) on ``server``.

        ``figures`` as ``_record``'s, one for each span, in order: where
        nsqd's CPU time is read, its CPU µs per call in each span is recorded
        too, as ``_cpu`` of the span's figure.
        """

        def measured() -> dict[str, Any]:
            results = measure(server.system, server.address, server.name, workload, count, window, size, env,
                              server.watched)  # fmt: skip
            for span, figure in zip(results.pop("cpu_s"), figures.values(), strict=True):
                if NSQD in span:
                    results[_cpu(figure)] = _per_call_us(span[NSQD], count)
            return results

        cpu_figures = {_cpu(figure): _cpu(figure) for figure in figures.values()} if NSQD in server.watched else {}
        self._record(server.column, label, measured, **figures, **cpu_figures)

    def nsqd_cpu_note(self, running: list[brokers.Broker]) -> str:
        """What the main table's NSQD_CPU column shows, or why it is empty."""
        if self.settings.nsqd:
            return (
                f"{NSQD_CPU}: not measured: the bench did not start the nsqd that --nsqd names, so it does not know "
                "its pid and cannot read its CPU time from /proc."
            )
        if not any(broker.pid is not None for broker in running if broker.name == NSQD):
            return f"{NSQD_CPU}: not measured (no nsqd)."
        tick = 1 / os.sysconf("SC_CLK_TCK")
        sequential, in_flight = self._count("rpc sequential"), self._count("rpc in flight")
        return (
            f"{NSQD_CPU}: nsqd's user+system time (/proc/<pid>/stat) while the row's calls ran on it (after the "
            "caller's warm-up, before it leaves), over those calls; the p50, p90 and p99 rows share their workload's "
            f"figure.\n/proc counts in ticks of {_format(tick * 1e3)} ms: one tick is "
            f"{_format(_per_call_us(tick, sequential))} µs/call over the {sequential:,} sequential calls, "
            f"{_format(_per_call_us(tick, in_flight))} over the {in_flight:,} in flight, "
            f"{_format(_per_call_us(tick, STRESS_CALLS))} over {STRESS_CALLS}."
        )

    def publish_and_consume(
        self, running: list[brokers.Broker], nats: str | None, go_clients: GoClients | None
    ) -> None:
        """Publishing and consuming on every broker (almanet, then NSQ's Go clients) and on JetStream."""
        for _ in self._rounds():
            for broker in running:
                self._record(
                    broker.name, f"produce() {PUBLISH_WINDOW} in flight",
                    partial(self._almanet, broker, "publish", self._count("produce"), PUBLISH_WINDOW),
                    per_second="produce",
                )  # fmt: skip
            if nats:
                self._record(
                    JETSTREAM, f"acked publish {PUBLISH_WINDOW} in flight",
                    partial(self._jetstream, nats, "publish", self._count("jetstream publish"), PUBLISH_WINDOW),
                    per_second="produce",
                )  # fmt: skip
            for broker in running:
                self._record(
                    broker.name, f"produce_batch() x{GO_BATCH}",
                    partial(self._almanet, broker, "publish_batches", self._count("produce_batch"), 0),
                    per_second="produce_batch",
                )  # fmt: skip
            for broker in running:
                self._record(
                    broker.name, "consume, commit each",
                    partial(self._almanet, broker, "consume", self._count("consume"), CONSUME_WINDOW),
                    per_second="consume",
                )  # fmt: skip
            if nats:
                self._record(
                    JETSTREAM, "pull consumer, ack each",
                    partial(self._jetstream, nats, "consume", self._count("jetstream consume"), CONSUME_WINDOW),
                    per_second="consume",
                )  # fmt: skip
            if go_clients:
                for broker in running:
                    self._go_clients(go_clients, broker)

    def cluster(self, nsqd: str, nsqlookupd: str) -> None:
        """RPC from CALLERS callers at once on one nsqd, then on a cluster, every round.

        Each setup has nsqd of its own (with the same flags) and a service,
        started once: one nsqd is a ``Cluster`` of one node, without
        nsqlookupd. On the cluster, the service is given node 0 and every
        nsqlookupd, and caller ``i`` node ``i`` only.
        """
        # (column, the callers' addresses, service name, pids of the service and of every nsqd by name)
        setups: list[tuple[str, list[str], str, dict[str, int]]] = []
        with contextlib.ExitStack() as stack:
            for column, nodes, lookupds in ((ONE_NSQD, 1, 0), (CLUSTER, CLUSTER_NODES, CLUSTER_LOOKUPDS)):
                daemons = stack.enter_context(
                    Cluster(nsqd, nsqlookupd, nodes=nodes, lookupds=lookupds, nsqd_flags=brokers.NSQD_FLAGS)
                )
                name = self._name("rpc")
                addresses = ",".join([daemons.tcp(0), *daemons.lookupd_http])
                watched = {"service": stack.enter_context(service_process("almanet", addresses, name, self.env)).pid}
                for index, node in enumerate(daemons.nodes):
                    assert node is not None
                    watched[f"nsqd {index}"] = node.process.pid
                setups.append((column, [daemons.tcp(index % nodes) for index in range(CALLERS)], name, watched))
            for _ in self._rounds():
                for column, callers, name, watched in setups:
                    self._record(
                        column, f"RPC, {CALLERS} callers x {RPC_WINDOW} in flight, {PAYLOADS[CALL_SIZE]}",
                        partial(self._rpc_under_load, callers, name, watched),
                        **CLUSTER_FIGURES, nsqd_cpu_us_by_node=NSQD_CPU_BY_NODE,
                    )  # fmt: skip

    def _rpc_under_load(self, callers: list[str], name: str, watched: dict[str, int]) -> dict[str, Any]:
        """The figures of ``workers.rpc_under_load``, CPU times in microseconds per call."""
        measured = rpc_under_load(callers, name, self._count("rpc under load"), RPC_WINDOW, CALL_SIZE, watched,
                                  self.env)  # fmt: skip
        calls = measured["calls"]
        per_call = {process: _per_call_us(seconds, calls) for process, seconds in measured["cpu_s"].items()}
        by_node = [per_call[process] for process in watched if process.startswith("nsqd")]
        return {
            "per_second": calls / measured["seconds"],
            "p50_us": _percentile(measured["latencies_us"], 0.5),
            "callers_cpu_us": per_call["callers"],
            "service_cpu_us": per_call["service"],
            "nsqd_cpu_us": sum(by_node),
            "nsqd_cpu_us_by_node": by_node,
        }

    def _almanet(self, broker: brokers.Broker, workload: str, count: int, window: int) -> dict[str, Any]:
        return measure("almanet", broker.tcp_address, broker.fresh_topic(), workload, count, window, MESSAGE_SIZE,
                       self.env)  # fmt: skip

    def _jetstream(self, nats: str, workload: str, count: int, window: int) -> dict[str, Any]:
        return measure("jetstream", nats, self._name("js"), workload, count, window, MESSAGE_SIZE, self.env)

    def _go_clients(self, go_clients: GoClients, broker: brokers.Broker) -> None:
        """bench_writer fills a topic of its own, then bench_reader reads from it."""
        topic = broker.fresh_topic()
        write_seconds, read_seconds = self._seconds(GO_WRITER_SECONDS), self._seconds(GO_READER_SECONDS)
        self._record(
            broker.name, f"NSQ Go bench_writer MPUB x{GO_BATCH}",
            lambda: {"per_second": go_clients.write(broker.tcp_address, topic, write_seconds, MESSAGE_SIZE, GO_BATCH)},
            per_second="bench_writer",
        )  # fmt: skip
        self._record(
            broker.name, "NSQ Go bench_reader",
            lambda: {"per_second": go_clients.read(broker.tcp_address, topic, read_seconds, MESSAGE_SIZE)},
            per_second="bench_reader",
        )  # fmt: skip
        if broker.channel_depth(topic, "ch") == 0:
            self.notes.append(
                f"bench_reader emptied its topic on {broker.name} in round {self._round + 1}: "
                "its figure there is a lower bound."
            )


def _per_call_us(cpu_seconds: float, calls: int) -> float:
    return cpu_seconds * 1e6 / calls


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _median(samples: dict[tuple[str, str], list[Any]], figure: str, column: str) -> float | None:
    rounds = samples.get((figure, column))
    return statistics.median(rounds) if rounds else None


def _figure(samples: dict[tuple[str, str], list[Any]], row: Row, column: str) -> float | None:
    if row.percentile is None:
        return _median(samples, row.figure, column)
    rounds = samples.get((row.figure, column))
    return _percentile(list(itertools.chain.from_iterable(rounds)), row.percentile) if rounds else None


def _result(row: Row, figures: dict[str, float | None], checked: str, samples: dict[tuple[str, str], list[Any]]) -> str:
    """How the checked broker's figure of ``row`` stands against its target: the ratio if any, met or missed."""
    target, value = row.target, figures[checked]
    if target is None or value is None:
        return ""
    if not target.reference:
        met = value < target.bound if target.at_most else value > target.bound
        return "met" if met else "MISSED"
    reference = figures[NATS] if target.reference == NATS else _median(samples, target.reference, checked)
    if reference is None:
        return "-"
    ratio = value / reference
    met = ratio <= target.bound if target.at_most else ratio >= target.bound
    return f"{ratio:.2f}x " + ("met" if met else "MISSED")


def _table(table_rows: list[Row], samples: dict[tuple[str, str], list[Any]], nsqd_cpu_note: str) -> str:
    checked = NSQD if any(column == NSQD for _, column in samples) else EMBEDDED
    header = ["workload", "unit", EMBEDDED, NSQD, "embedded/nsqd", NATS, JETSTREAM, NSQD_CPU, "target",
              f"result on {checked}"]  # fmt: skip
    cells = [header]
    apart = False
    for row in table_rows:
        figures = {column: _figure(samples, row, column) for column in (EMBEDDED, NSQD, NATS, JETSTREAM)}
        embedded, nsqd = figures[EMBEDDED], figures[NSQD]
        between = ""
        if embedded and nsqd:
            between = f"{embedded / nsqd:.2f}x"
            if max(embedded / nsqd, nsqd / embedded) > WITHIN:
                between, apart = between + " *", True
        nsqd_cpu = _median(samples, _cpu(row.figure), NSQD) if row.rpc else None
        cells.append(
            [row.workload, row.unit, *(_format(figures[column]) for column in (EMBEDDED, NSQD)), between,
             *(_format(figures[column]) for column in (NATS, JETSTREAM)), "" if nsqd_cpu is None else _format(nsqd_cpu),
             str(row.target or ""), _result(row, figures, checked, samples)]
        )  # fmt: skip
    text = _aligned(cells, left=(0, 1, 8, 9))
    text.append("")
    text.append(f"Targets are checked on {checked}'s column: its figure over the reference's, from the same run.")
    if apart:
        text.append(f"* the embedded broker and nsqd are more than {WITHIN:g}x apart on this workload.")
    text.append(nsqd_cpu_note)
    return "\n".join(text)


def _cluster_table(samples: dict[tuple[str, str], list[Any]]) -> str:
    header = ["setup", "calls/s", "p50 µs", "callers CPU µs/call", "service CPU µs/call", "nsqd CPU µs/call"]
    cells = [header] + [
        [column, *(_format(_median(samples, figure, column)) for figure in CLUSTER_FIGURES.values())]
        for column in (ONE_NSQD, CLUSTER)
    ]
    by_node = samples.get((NSQD_CPU_BY_NODE, CLUSTER))
    title = f"{CLUSTER_TITLE} ({CALLERS} callers x {RPC_WINDOW} in flight, {PAYLOADS[CALL_SIZE]}, medians of rounds)"
    text = [title, "", *_aligned(cells, left=(0,)), ""]
    text.append(
        f"CPU µs/call: each process's user+system time while the {CALLERS} callers make their calls (after their "
        "warm-ups), over all their calls."
    )
    if by_node:
        shown = ", ".join(_format(statistics.median(node)) for node in zip(*by_node, strict=True))
        text.append(f"nsqd CPU µs/call on the cluster, node by node: {shown}.")
    text.append(
        "Each caller is given one nsqd only, on the cluster its own node; the service there is given node 0 and "
        "every nsqlookupd, and reads from every node."
    )
    text.append(
        f"The machine has {os.cpu_count()} cores for the {CLUSTER_NODES + 1 + CALLERS} busy processes of the "
        f"cluster ({CLUSTER_NODES} nsqd, the service, {CALLERS} callers; {1 + 1 + CALLERS} on one nsqd): "
        "with fewer cores than processes, no scale-up is expected."
    )
    return "\n".join(text)


def _aligned(cells: list[list[str]], left: tuple[int, ...]) -> list[str]:
    """``cells`` as lines of columns, a rule under the header; the ``left`` columns left-aligned, others right."""
    widths = [max(len(line[column]) for line in cells) for column in range(len(cells[0]))]
    text = [
        "  ".join(cell.ljust(width) if column in left else cell.rjust(width) for column, (cell, width) in
                  enumerate(zip(line, widths, strict=True))).rstrip()
        for line in cells
    ]  # fmt: skip
    text.insert(1, "  ".join("-" * width for width in widths))
    return text


def _machine(
    settings: Settings,
    running: list[brokers.Broker],
    nats: bool,
    nsqd_executable: str | None,
    nsqlookupd_executable: str | None,
    go_clients: GoClients | None,
    load_before: float,
) -> str:
    import almanet

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    versions = [f"almanet {almanet.__version__}"]
    for package in ("nats-py", "msgpack", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    servers = [", ".join(broker.name for broker in running)] if running else []
    if nsqd_executable:
        servers.append(_version_line([nsqd_executable, "--version"]) + f" ({nsqd_executable})")
    elif settings.nsqd:
        servers.append(f"nsqd at {settings.nsqd}")
    if nsqlookupd_executable:
        servers.append(_version_line([nsqlookupd_executable, "--version"]) + f" ({nsqlookupd_executable})")
    if nats:
        servers.append(_version_line(["nats-server", "--version"]))
    if go_clients:
        servers.append(f"NSQ Go clients {os.path.dirname(go_clients.writer)}")
    speedups = "ALMANET_NO_EXTENSIONS (pure)" if settings.pure else f"compiled {almanet.speedups()}"
    return "\n".join(
        [
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"load average {load_before:.2f} before the run",
            f"python: {platform.python_implementation()} {platform.python_version()}, loop {settings.loop}",
            "brokers: " + "; ".join(servers),
            f"almanet: {speedups}; --scale {settings.scale:g}, {settings.rounds} rounds",
            "versions: " + ", ".join(versions),
        ]
    )


def _version_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0]
