"""After pytest-benchmark's tables, the ratios the issues set targets on.

Each benchmark group compares implementations of one workload; the summary
prints how many times faster each one is than every slower one, by median,
and the message rates of the benchmarks that record one.
"""

import contextlib
import dataclasses
import itertools
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from itertools import combinations

import pytest


@dataclasses.dataclass
class BenchBroker:
    """The broker under test: an embedded broker in a process of its own, or nsqd given by ALMANET_TEST_NSQD."""

    name: str
    tcp_address: str
    http_address: str
    _topics: list[str] = dataclasses.field(default_factory=list)

    def fresh_topic(self) -> str:
        """A new topic name; the topics handed out before are deleted, so rounds start from the same state."""
        while self._topics:
            query = urllib.parse.urlencode({"topic": self._topics.pop()})
            request = urllib.request.Request(f"http://{self.http_address}/topic/delete?{query}", method="POST")
            with contextlib.suppress(urllib.error.HTTPError):  # never created
                urllib.request.urlopen(request, timeout=10).close()
        topic = f"bench.{os.getpid()}.{next(_topic_numbers)}"
        self._topics.append(topic)
        return topic


_topic_numbers = itertools.count()


@pytest.fixture(scope="session")
def bench_broker() -> Iterator[BenchBroker]:
    external = os.environ.get("ALMANET_TEST_NSQD")
    if external:
        yield BenchBroker("nsqd", external, os.environ["ALMANET_TEST_NSQD_HTTP"])
        return
    process = subprocess.Popen(
        [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    listening = (line for line in process.stderr if "listening on" in line)
    addresses = [next(listening).rsplit(" ", 1)[1].strip() for _ in ("TCP", "HTTP")]
    try:
        yield BenchBroker("embedded", *addresses)
    finally:
        process.terminate()
        process.wait(timeout=10)


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
