"""``almanet bench --only cluster`` runs end to end and prints its table (tiny counts: a smoke test, not a measurement).

Skipped where nsqd or nsqlookupd is not found.
"""

import re
import subprocess
import sys

import pytest

from almanet.bench.runner import CLUSTER, CLUSTER_TITLE, ONE_NSQD
from almanet.broker.nsqd import find_nsqd, find_nsqlookupd

pytestmark = pytest.mark.skipif(
    not (find_nsqd() and find_nsqlookupd()), reason="nsqd or nsqlookupd not found (ALMANET_NSQD, PATH)"
)


def test_almanet_bench_only_cluster_prints_both_setups_with_figures() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "almanet", "bench", "--only", "cluster", "--scale", "0.005", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    table = done.stdout
    assert table.startswith(CLUSTER_TITLE)
    figure = r"\s+[\d,.]+"
    for setup in (ONE_NSQD, CLUSTER):
        assert re.search(rf"^{setup}(?:{figure}){{5}}$", table, re.MULTILINE), (setup, table)
    assert re.search(rf"node by node:{figure},{figure},{figure}\.", table), table
    assert "Targets are checked" not in table  # the other workloads are not run
    assert "round 1/1, RPC, 3 callers x 256 in flight, 7 B, 3-nsqd cluster:" in done.stderr
