"""Pending-call table speed: compiled twin and pure twin.

Target: registering a call and resolving it (``add`` then ``pop``) >= 3x
faster compiled than pure. Every call has the same relative timeout, as a
session's calls do, on a loop clock that moves on between calls.
"""

import importlib
from collections import deque
from collections.abc import Callable
from types import ModuleType

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

CALLS = 1000
TIMEOUT = 30.0
DEADLINES = [i * 1e-5 + TIMEOUT for i in range(CALLS)]
WAITER = object()


def twin(implementation: str) -> ModuleType:
    return importlib.import_module(f"almanet._speedups.pending_{implementation}")


def add_then_pop(implementation: str) -> Callable[[], int]:
    """1000 calls registered, then resolved in the order they were made."""
    table = twin(implementation).PendingCalls()
    add, pop = table.add, table.pop

    def round_() -> int:
        call_ids = [add(WAITER, deadline) for deadline in DEADLINES]
        for call_id in call_ids:
            pop(call_id)
        return len(table)

    return round_


def in_flight(implementation: str, calls_in_flight: int) -> Callable[[], int]:
    """1000 times: register a call, resolve the oldest, with ``calls_in_flight`` calls waiting throughout."""
    table = twin(implementation).PendingCalls()
    add, pop = table.add, table.pop
    # Call ids are random: the calls waiting, oldest first.
    waiting = deque(add(WAITER, deadline) for deadline in DEADLINES[:calls_in_flight])
    push, oldest = waiting.append, waiting.popleft

    def round_() -> int:
        for deadline in DEADLINES:
            push(add(WAITER, deadline))
            pop(oldest())
        return len(table)

    return round_


def add_then_expire(implementation: str) -> Callable[[], int]:
    """1000 calls registered, then all timed out by one ``expire``."""
    table = twin(implementation).PendingCalls()
    add = table.add

    def round_() -> int:
        for deadline in DEADLINES:
            add(WAITER, deadline)
        return len(table.expire(DEADLINES[-1]))

    return round_


@pytest.mark.benchmark(group=f"pending add+pop ({CALLS} calls)")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_add_then_pop(benchmark: BenchmarkFixture, implementation: str) -> None:
    assert benchmark(add_then_pop(implementation)) == 0


@pytest.mark.benchmark(group="pending add+pop (256 in flight)")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_add_pop_256_in_flight(benchmark: BenchmarkFixture, implementation: str) -> None:
    assert benchmark(in_flight(implementation, 256)) == 256


@pytest.mark.benchmark(group=f"pending add+expire ({CALLS} calls)")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_add_then_expire(benchmark: BenchmarkFixture, implementation: str) -> None:
    assert benchmark(add_then_expire(implementation)) == CALLS
