"""The brokers the client benchmarks run on; after pytest-benchmark's tables, the ratios the issues set targets on.

``bench_broker`` is almanet's embedded broker in a process of its own, then
nsqd when there is one: the running one ``ALMANET_TEST_NSQD=host:port`` names
(its HTTP address ``ALMANET_TEST_NSQD_HTTP``, else its TCP port + 1), else the
binary ``ALMANET_NSQD`` names or ``nsqd`` on ``PATH``, started on free loopback
ports (``almanet.bench.brokers``, as ``almanet bench`` does). A benchmark that
takes it runs on each broker; its id names the broker.

Each benchmark group compares implementations of one workload; the summary
prints how many times faster each one is than every slower one, by median,
and the message rates of the benchmarks that record one.
"""

import os
from collections.abc import Iterator
from itertools import combinations

import pytest

from almanet.bench import brokers
from almanet.broker.nsqd import find_nsqd


def _broker_names() -> list[str]:
    if os.environ.get("ALMANET_TEST_NSQD") or find_nsqd():
        return ["embedded", "nsqd"]
    return ["embedded"]


@pytest.fixture(scope="session", params=_broker_names())
def bench_broker(request: pytest.FixtureRequest) -> Iterator[brokers.Broker]:
    if request.param == "embedded":
        with brokers.embedded_broker() as broker:
            yield broker
        return
    running = os.environ.get("ALMANET_TEST_NSQD")
    if running:
        yield brokers.running_nsqd(running, os.environ.get("ALMANET_TEST_NSQD_HTTP"))
        return
    executable = find_nsqd()
    assert executable is not None
    with brokers.nsqd(executable) as broker:
        yield broker


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        if bench.stats:
            groups.setdefault(bench.group or bench.name, {})[str(bench.param)] = bench.stats.median
    terminalreporter.section("speed ratios (median time, slower / faster)")
    for group, medians in sorted(groups.items()):
        if len(medians) < 2:
            continue
        ranked = sorted(medians.items(), key=lambda item: item[1])
        ratios = [
            f"{fast} {slow_time / fast_time:.1f}x {slow}"
            for (fast, fast_time), (slow, slow_time) in combinations(ranked, 2)
        ]
        terminalreporter.write_line(f"{group}: " + ", ".join(ratios))
    throughputs = [bench for bench in session.benchmarks if "msgs_per_s" in bench.extra_info]
    if throughputs:
        terminalreporter.section("throughput (by median round)")
        for bench in throughputs:
            terminalreporter.write_line(f"{bench.group}, {bench.name}: {bench.extra_info['msgs_per_s']:,.0f} msgs/s")
