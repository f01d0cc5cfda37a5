"""After pytest-benchmark's tables, the ratios the issues set targets on.

Each benchmark group compares implementations of one workload; the summary
prints how many times faster each one is than every slower one, by median,
and the message rates of the benchmarks that record one.
"""

from itertools import combinations

import pytest


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
