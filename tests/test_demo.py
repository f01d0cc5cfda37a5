"""`make demo` runs examples/demo.py: the examples on the embedded broker, end to end."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_every_example() -> None:
    done = subprocess.run(
        [sys.executable, "examples/demo.py"], cwd=PROJECT, capture_output=True, text=True, timeout=120, check=True
    )
    for line in (
        "[caller] net.example.greeting('Aidar'): Hello, Aidar!",
        "[caller] during call net.example.greeting('guest'): denied",
        "[caller] net.example.missing: nothing serves net.example.missing: no service answered within 0.75 s",
        '[almanet call] "Hello, Demo!"',
        "[producer] producer: 3 orders produced to net.example.orders",
        "[consumer] consumer: order 0 rolled back (attempt 1)",
        "[consumer] consumer: order 0 committed (attempt 2)",
        "service: stopped on SIGTERM, exit code 0",
        "/stats net.example.orders/kitchen: messages 3, requeued 1, in flight 0, depth 0",
    ):
        assert line in done.stdout, (line, done.stdout, done.stderr)
