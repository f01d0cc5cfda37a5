"""``almanet bench`` runs end to end and prints its table (tiny counts: a smoke test, not a measurement).

It measures nsqd beside the embedded broker when nsqd is found (ALMANET_NSQD or
PATH), and says so when it is not: the test passes either way.
"""

import subprocess
import sys

from almanet.bench.go_clients import find_go_clients
from almanet.bench.runner import rows
from almanet.broker.nsqd import find_nsqd


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
    if nsqd:
        assert "brokers: embedded, nsqd" in table
        assert "result on nsqd" in table
    else:
        assert "nsqd: not found" in table
        assert "result on embedded" in table
    assert ("NSQ Go clients: not found" in table) is (find_go_clients(nsqd) is None)
    assert "round 1/1, RPC sequential 7 B, embedded" in done.stderr  # the progress lines
