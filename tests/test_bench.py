"""``almanet bench`` runs end to end and prints its table (tiny counts: a smoke test, not a measurement).

It measures nsqd beside the embedded broker when nsqd is found (ALMANET_NSQD or
PATH), and says so when it is not: the test passes either way. The table's
layout, its column of nsqd's CPU per call above all, is checked on figures
made up here too.
"""

import re
import subprocess
import sys

from almanet.bench.go_clients import find_go_clients
from almanet.bench.runner import EMBEDDED, NSQD, NSQD_CPU, Settings, _Bench, _cpu, _table, rows
from almanet.broker.nsqd import find_nsqd


def cells_of(table: str) -> dict[str, dict[str, str]]:
    """The main table's cells, by row (its workload) and column (its header), cut where its rule's dashes are."""
    header, rule, *lines = table.split("\n\n")[0].splitlines()
    spans = [match.span() for match in re.finditer(r"-+", rule)]
    columns = [header[start:end].strip() for start, end in spans]
    cut = [[line[start:end].strip() for start, end in spans] for line in lines]
    return {cells[0]: dict(zip(columns, cells, strict=True)) for cells in cut}


def test_almanet_bench_prints_every_row_and_the_machine() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "almanet", "bench", "--scale", "0.005", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    table = done.stdout
    for row in rows(pure=False):
        assert row.workload in table, row.workload
    for line in ("machine:", "python:", "versions:"):
        assert line in table, line
    nsqd = find_nsqd()
    cells = cells_of(table)
    if nsqd:
        assert "brokers: embedded, nsqd" in table
        assert "result on nsqd" in table
        for row in rows(pure=False):  # nsqd's CPU per call on the RPC rows, on them only
            assert bool(cells[row.workload][NSQD_CPU]) is row.rpc, (row.workload, table)
        assert f"{NSQD_CPU}: nsqd's user+system time" in table
    else:
        assert "nsqd: not found" in table
        assert "result on embedded" in table
        assert not any(cells[row.workload][NSQD_CPU] for row in rows(pure=False))
    assert ("NSQ Go clients: not found" in table) is (find_go_clients(nsqd) is None)
    assert "round 1/1, RPC sequential 7 B, embedded" in done.stderr  # the progress lines


def test_the_nsqd_cpu_column_has_the_median_of_each_rpc_workload_and_nothing_elsewhere() -> None:
    table_rows = rows(pure=False)
    samples: dict[tuple[str, str], list[object]] = {}
    for number, row in enumerate(table_rows):
        figure = [100.0, 200.0, 300.0] if row.percentile is not None else 1000.0 + number
        samples[row.figure, EMBEDDED] = samples[row.figure, NSQD] = [figure]
        if row.rpc:  # once for the p50, p90 and p99 rows' workload: its first row's number
            samples.setdefault((_cpu(row.figure), NSQD), [number + 10.0, number + 30.0, number + 20.0])  # rounds
    note = "the note on the column"
    text = _table(table_rows, samples, note)
    cells = cells_of(text)
    assert list(next(iter(cells.values())))[7] == NSQD_CPU  # after the NATS and JetStream columns
    rpc_rows = [row for row in table_rows if row.rpc]
    assert [row.figure for row in rpc_rows] == [
        *(["rpc sequential 7"] * 3), *(["rpc sequential 1024"] * 3), "rpc in flight 7", "rpc in flight 1024",
        "rpc in flight pure", "stress sequential", "stress concurrent",
    ]  # fmt: skip
    for number, row in enumerate(table_rows):
        expected = f"{number + 20.0:.1f}" if row.rpc else ""
        if row.rpc and row.percentile is not None:  # p50, p90 and p99 share their workload's (the first row's)
            first = next(index for index, other in enumerate(table_rows) if other.figure == row.figure)
            expected = f"{first + 20.0:.1f}"
        assert cells[row.workload][NSQD_CPU] == expected, (row.workload, text)
    assert text.endswith(note)


def test_the_nsqd_cpu_column_says_why_it_is_empty_with_a_running_nsqd() -> None:
    settings = Settings(nsqd="127.0.0.1:4150", nsqd_http=None, loop="asyncio", pure=False, scale=1.0, rounds=1,
                        only=None)  # fmt: skip
    note = _Bench(settings, {}, {}).nsqd_cpu_note([])
    assert note.startswith(f"{NSQD_CPU}: not measured") and "--nsqd" in note and "pid" in note
    table_rows = rows(pure=False)
    samples: dict[tuple[str, str], list[object]] = {
        (row.figure, NSQD): [[1.0] if row.percentile is not None else 1.0] for row in table_rows
    }
    cells = cells_of(_table(table_rows, samples, note))
    assert not any(cells[row.workload][NSQD_CPU] for row in table_rows)
