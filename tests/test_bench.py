"""``almanet bench`` runs end to end and prints its table (tiny counts: a smoke test, not a measurement)."""

import subprocess
import sys


def test_almanet_bench_prints_every_row_and_the_machine() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "almanet", "bench", "--scale", "0.005"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    table = done.stdout
    for row in (
        "RPC sequential latency p50",
        "RPC, 64 calls in flight",
        "RPC, 256 calls in flight",
        "RPC, 256 calls in flight, ALMANET_NO_EXTENSIONS",
        "publish 200 B, produce() with 64 in flight",
        "publish 200 B, produce_batch() x200",
        "consume 200 B, commit each",
        "compiled / ALMANET_NO_EXTENSIONS",
        "machine:",
        "python:",
    ):
        assert row in table, row
    assert "RPC sequential, almanet" in done.stderr  # the progress lines
