"""The pending-call table. Both twins."""

import gc
import itertools
import math
import os
import random
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, get_args, get_origin

import pytest


class Waiter:
    """A waiter that can be weakly referenced, as futures can."""

    def __init__(self, name: object = None) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Waiter({self.name!r})"


class Unhashable:
    """A waiter whose comparison and hashing fail: the table must never call them."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("the table compared a waiter")

    def __hash__(self) -> int:
        raise AssertionError("the table hashed a waiter")


def table_of(pending: ModuleType, *deadlines: float) -> tuple[Any, list[Waiter], list[int]]:
    table = pending.PendingCalls()
    waiters = [Waiter(i) for i in range(len(deadlines))]
    call_ids = [table.add(waiter, deadline) for waiter, deadline in zip(waiters, deadlines, strict=True)]
    return table, waiters, call_ids


@pytest.fixture
def script_ids(pending: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``script_ids(a, b, ...)``: the ids drawn next are a, b, ... (then random ones).

    The next draw from ``os.urandom`` starts with them; the ids drawn and not
    issued are dropped before and after, so no other test gets them.
    """

    def script(*call_ids: int) -> None:
        real_urandom = os.urandom

        def urandom(size: int) -> bytes:
            monkeypatch.setattr(os, "urandom", real_urandom)
            scripted = struct.pack(f"={len(call_ids)}Q", *call_ids)
            return scripted + real_urandom(size - len(scripted))

        monkeypatch.setattr(os, "urandom", urandom)
        pending._forget_random_ids()

    yield script
    pending._forget_random_ids()


# --- ids, get, pop ------------------------------------------------------------


def test_call_ids_are_random_uint64s(pending: ModuleType) -> None:
    _, _, call_ids = table_of(pending, *[1.0] * 1000)
    assert all(type(call_id) is int and 0 < call_id < 2**64 for call_id in call_ids)
    assert len(set(call_ids)) == 1000
    # Not a counter, nor anything near one: ids below 2**32 are 1 in 2**32.
    assert sum(call_id < 2**32 for call_id in call_ids) == 0
    assert not any(abs(b - a) < 2**32 for a, b in itertools.pairwise(call_ids))
    # Each table draws from the same stream: a new table does not start over.
    assert pending.PendingCalls().add(Waiter(), 1.0) not in call_ids


def test_100000_calls_get_100000_ids(pending: ModuleType) -> None:
    table = pending.PendingCalls()
    waiter = Waiter()
    call_ids = {table.add(waiter, 1.0) for _ in range(100_000)}
    assert len(call_ids) == len(table) == 100_000


def test_call_ids_look_uniform(pending: ModuleType) -> None:
    """Each of the 64 bits is set in about half of the ids (10,000 ids: 5,000 +- 6 standard deviations of 50)."""
    table = pending.PendingCalls()
    call_ids = [table.add(Waiter(), 1.0) for _ in range(10_000)]
    for bit in range(64):
        assert 4_700 <= sum(call_id >> bit & 1 for call_id in call_ids) <= 5_300, bit
    # The high bit as well as any: ids fill the whole of uint64.
    assert 4_700 <= sum(call_id >= 2**63 for call_id in call_ids) <= 5_300


def test_ids_never_issued_are_absent(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, *[1.0] * 100)
    rng = random.Random(13)
    never_issued = [rng.getrandbits(64) for _ in range(10_000)]
    never_issued += [call_id + 1 for call_id in call_ids] + [call_id ^ 1 for call_id in call_ids]
    never_issued += [1, 2, 3, 2**63]
    for call_id in set(never_issued) - set(call_ids):
        assert table.get(call_id) is None
        assert table.pop(call_id) is None
        assert call_id not in table
    assert len(table) == 100
    assert all(table.get(call_id) is waiter for call_id, waiter in zip(call_ids, waiters, strict=True))


def test_ids_are_drawn_from_the_os_in_bulk(pending: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real_urandom = os.urandom

    def urandom(size: int) -> bytes:
        draws.append(size)
        return real_urandom(size)

    monkeypatch.setattr(os, "urandom", urandom)
    pending._forget_random_ids()
    table = pending.PendingCalls()
    for _ in range(1024):
        table.add(Waiter(), 1.0)
    assert draws == [4096, 4096]
    table.add(Waiter(), 1.0)
    assert draws == [4096, 4096, 4096]
    pending._forget_random_ids()


def test_zero_and_ids_in_use_are_drawn_again(pending: ModuleType, script_ids: Callable[..., None]) -> None:
    a, b = 2**64 - 1, 5
    script_ids(0, a, a, 0, a, b)
    table = pending.PendingCalls()
    first, second = Waiter(), Waiter()
    assert table.add(first, 1.0) == a
    assert table.add(second, 1.0) == b
    assert table.get(a) is first and table.get(b) is second and len(table) == 2
    assert 0 not in table


def test_a_gone_calls_id_drawn_again_is_a_new_call(pending: ModuleType, script_ids: Callable[..., None]) -> None:
    """The record of a popped call's deadline outlives it: it must not be taken for a new call with the same id.

    The compiled twin issues the id again at once (records carry the order of
    their call); the pure one only once the record is gone (ids stay taken
    until then). Either is unique among the calls in the table.
    """
    a = 2**63 + 7
    table = pending.PendingCalls()
    table.add(Waiter("kept"), 10.0)
    script_ids(a, a)
    first, second = Waiter("first"), Waiter("second")
    assert table.add(first, 1.0) == a
    assert table.pop(a) is first
    call_id = table.add(second, 5.0)
    assert (call_id == a) is pending.__name__.endswith("_c")
    assert table.expire(1.0) == []
    assert table.next_deadline() == 5.0
    assert table.get(call_id) is second
    assert table.expire(5.0) == [second]
    assert table.get(call_id) is None and len(table) == 1


def test_equal_deadlines_expire_in_call_order_whatever_the_ids(
    pending: ModuleType, script_ids: Callable[..., None]
) -> None:
    script_ids(5, 4, 3, 2**64 - 1, 1)
    table, waiters, call_ids = table_of(pending, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert call_ids == [5, 4, 3, 2**64 - 1, 1]
    assert table.expire(1.0) == waiters


def test_threads_drawing_at_once_never_share_an_id(pending: ModuleType) -> None:
    """Tables in several threads draw from one buffer, refilled while other threads run (os.urandom lets them)."""
    results: list[list[int]] = []

    def issue() -> None:
        table = pending.PendingCalls()
        waiter = Waiter()
        results.append([table.add(waiter, 1.0) for _ in range(20_000)])

    threads = [threading.Thread(target=issue) for _ in range(4)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert len(results) == 4
    assert len({call_id for ids in results for call_id in ids}) == 80_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_issues_other_ids_than_its_parent(pending: ModuleType) -> None:
    """The child inherits the ids its parent drew and has not issued yet: it must not issue them too."""
    program = f"""
import os, struct, sys
from almanet._speedups.pending_{pending.__name__.rsplit("_", 1)[1]} import PendingCalls

table = PendingCalls()
table.add(object(), 1.0)  # the buffer holds the ids drawn and not issued
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    ids = [table.add(object(), 1.0) for _ in range(1000)]
    os.write(write, struct.pack("=1000Q", *ids))
    os._exit(0)
os.close(write)
parent = [table.add(object(), 1.0) for _ in range(1000)]
data = b""
while len(data) < 8000:
    chunk = os.read(read, 8000 - len(data))
    if not chunk:
        break
    data += chunk
_, status = os.waitpid(pid, 0)
child = struct.unpack("=1000Q", data)
assert status == 0, status
print(len(set(parent)), len(set(child)), len(set(parent) & set(child)))
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "1000", "0"]


def test_get_returns_the_waiter_and_keeps_it(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, 1.0, 2.0)
    assert table.get(call_ids[1]) is waiters[1]
    assert table.get(call_ids[1]) is waiters[1]
    assert len(table) == 2
    assert call_ids[0] in table and call_ids[1] in table


def test_pop_removes_and_returns_the_waiter(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, 1.0, 2.0, 3.0)
    assert table.pop(call_ids[1]) is waiters[1]
    assert table.pop(call_ids[1]) is None
    assert table.get(call_ids[1]) is None
    assert call_ids[1] not in table
    assert len(table) == 2
    assert table.get(call_ids[0]) is waiters[0] and table.get(call_ids[2]) is waiters[2]


def test_unknown_ids_are_absent(pending: ModuleType) -> None:
    table, _, _ = table_of(pending, 1.0)
    for call_id in (0, 2, -1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**64), 10**30):  # none issued (but by 1 in 2**64)
        assert table.get(call_id) is None
        assert table.pop(call_id) is None
        assert call_id not in table
    assert len(table) == 1


def test_any_object_but_none_is_a_waiter(pending: ModuleType) -> None:
    table = pending.PendingCalls()
    waiters: list[object] = [0, False, "", (), Unhashable(), Unhashable()]
    call_ids = [table.add(waiter, 1.0) for waiter in waiters]
    assert all(table.get(call_id) is waiter for call_id, waiter in zip(call_ids, waiters, strict=True))
    assert table.pop(call_ids[5]) is waiters[5]
    expired = table.expire(1.0)
    assert len(expired) == 5 and all(a is b for a, b in zip(expired, waiters[:5], strict=True))


def test_the_same_waiter_twice_is_two_calls(pending: ModuleType) -> None:
    table = pending.PendingCalls()
    waiter = Waiter()
    first, second = table.add(waiter, 1.0), table.add(waiter, 2.0)
    assert table.pop(first) is waiter
    assert table.get(second) is waiter and len(table) == 1


def test_int_subclasses_are_looked_up_by_value(pending: ModuleType, script_ids: Callable[..., None]) -> None:
    class OddInt(int):
        def __hash__(self) -> int:
            raise AssertionError("the table hashed a call id")

        def __eq__(self, other: object) -> bool:
            raise AssertionError("the table compared a call id")

        def __index__(self) -> int:
            raise AssertionError("the table converted a call id by __index__")

    script_ids(1, 2)
    table, waiters, _ = table_of(pending, 1.0, 2.0)
    assert table.get(True) is waiters[0]
    assert OddInt(2) in table
    assert table.get(OddInt(2)) is waiters[1]
    assert table.pop(OddInt(2)) is waiters[1]
    assert table.pop(OddInt(-5)) is None


def test_the_table_is_generic_at_run_time(pending: ModuleType) -> None:
    """``PendingCalls[Waiter]`` is what mypy is told, so it must work outside annotations too."""
    alias = pending.PendingCalls[Waiter]
    assert get_origin(alias) is pending.PendingCalls
    assert get_args(alias) == (Waiter,)
    table = alias()
    assert type(table) is pending.PendingCalls
    waiter = Waiter()
    assert table.get(table.add(waiter, 1.0)) is waiter


# --- deadlines, expire, next_deadline -------------------------------------------


def test_expire_takes_what_is_due_earliest_first(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, 3.0, 1.0, 2.0, 5.0)
    assert table.expire(0.5) == []
    assert table.expire(3.0) == [waiters[1], waiters[2], waiters[0]]
    assert len(table) == 1 and call_ids[3] in table
    assert all(call_id not in table for call_id in call_ids[:3])
    assert table.expire(100.0) == [waiters[3]]
    assert table.expire(100.0) == []


def test_expire_takes_equal_deadlines_in_call_order(pending: ModuleType) -> None:
    table, waiters, _ = table_of(pending, 2.0, 1.0, 2.0, 1.0, 2.0, -0.0, 0.0)
    assert table.expire(2.0) == [waiters[5], waiters[6], waiters[1], waiters[3], waiters[0], waiters[2], waiters[4]]


def test_expire_skips_popped_calls(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, 1.0, 2.0, 3.0)
    table.pop(call_ids[0])
    table.pop(call_ids[2])
    assert table.expire(10.0) == [waiters[1]]
    assert len(table) == 0


def test_items_are_the_calls_in_the_table(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, *[float(deadline) for deadline in range(100)])
    for call_id in call_ids[::3]:
        table.pop(call_id)
    table.expire(49.0)
    expected = [(call_ids[index], waiters[index]) for index in range(50, 100) if index % 3]
    assert sorted(table.items(), key=lambda item: item[0]) == sorted(expected, key=lambda item: item[0])
    assert all(type(call_id) is int for call_id, _ in table.items())
    assert pending.PendingCalls().items() == []


def test_next_deadline(pending: ModuleType) -> None:
    table = pending.PendingCalls()
    assert table.next_deadline() is None
    first = table.add(Waiter(), 5.0)
    assert table.next_deadline() == 5.0
    second = table.add(Waiter(), 2.0)
    table.add(Waiter(), 9.0)
    assert table.next_deadline() == 2.0
    table.pop(second)
    assert table.next_deadline() == 5.0
    table.pop(first)
    assert table.next_deadline() == 9.0
    table.expire(9.0)
    assert table.next_deadline() is None


def test_deadlines_are_floats(pending: ModuleType) -> None:
    table = pending.PendingCalls()
    table.add(Waiter(), 7)
    table.add(Waiter(), 2**53 + 1)  # rounds, as a float does
    deadline = table.next_deadline()
    assert type(deadline) is float and deadline == 7.0
    table.expire(7)
    assert table.next_deadline() == float(2**53)


def test_infinite_deadlines(pending: ModuleType) -> None:
    table, waiters, _ = table_of(pending, math.inf, -math.inf, 1e308)
    assert table.next_deadline() == -math.inf
    assert table.expire(-math.inf) == [waiters[1]]
    assert table.expire(1e308) == [waiters[2]]
    assert table.next_deadline() == math.inf
    assert table.expire(math.inf) == [waiters[0]]


# --- no residue --------------------------------------------------------------


def test_popped_and_expired_waiters_are_released(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, 1.0, 2.0, 3.0)
    refs = [weakref.ref(waiter) for waiter in waiters]
    table.get(call_ids[0])
    del waiters
    assert all(ref() is not None for ref in refs)
    table.pop(call_ids[0])
    assert refs[0]() is None
    table.expire(2.0)
    assert refs[1]() is None
    assert refs[2]() is not None
    table.pop(call_ids[2])
    assert refs[2]() is None


def test_a_dropped_table_releases_its_waiters(pending: ModuleType) -> None:
    table, waiters, _ = table_of(pending, 1.0, 2.0)
    refs = [weakref.ref(waiter) for waiter in waiters]
    del waiters, table
    assert all(ref() is None for ref in refs)


def test_a_cycle_through_a_waiter_is_collected(pending: ModuleType) -> None:
    """A waiter that refers to its table (through its session, say) must not keep both alive."""
    table = pending.PendingCalls()
    waiter = Waiter()
    waiter.name = table
    table.add(waiter, 1.0)
    ref = weakref.ref(waiter)
    del waiter, table
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("remove", ["pop", "expire", "both"])
def test_10000_calls_leave_nothing_behind(pending: ModuleType, remove: str) -> None:
    rng = random.Random(10_000)
    table = pending.PendingCalls()
    waiters = [Waiter(i) for i in range(10_000)]
    refs = [weakref.ref(waiter) for waiter in waiters]
    call_ids = [table.add(waiter, rng.uniform(0.0, 100.0)) for waiter in waiters]
    del waiters
    rng.shuffle(call_ids)
    if remove in ("pop", "both"):
        for call_id in call_ids[: 10_000 if remove == "pop" else 7_000]:
            assert table.pop(call_id) is not None
            assert table._bookkeeping_size <= 2 * len(table)
    if remove in ("expire", "both"):
        expired = table.expire(50.0)
        assert table._bookkeeping_size <= 2 * len(table)
        expired += table.expire(100.0)
        assert len(expired) == (10_000 if remove == "expire" else 3_000)
        del expired
    assert len(table) == 0
    assert table._bookkeeping_size == 0
    assert table.next_deadline() is None
    assert all(ref() is None for ref in refs)
    assert all(call_id not in table for call_id in call_ids)


def test_pops_of_calls_not_due_do_not_pile_up(pending: ModuleType) -> None:
    """With lazy deletion of deadlines, records of popped calls are dropped once they outnumber live calls."""
    table = pending.PendingCalls()
    for _ in range(100):
        table.add(Waiter(), 1e9)
    for step in range(10_000):
        table.pop(table.add(Waiter(), 1e9 + step))
        assert table._bookkeeping_size <= 2 * len(table)
    assert len(table) == 100
    assert table.next_deadline() == 1e9


@pytest.mark.parametrize("in_flight", [7, 8, 100, 8191])
def test_random_churn_finds_every_call(pending: ModuleType, in_flight: int) -> None:
    """Calls resolved in random order leave live ids scattered, so that they collide in a hash table."""
    rng = random.Random(in_flight)
    table = pending.PendingCalls()
    names = {table.add(Waiter(i), 1.0): i for i in range(in_flight)}
    live = list(names)
    issued = list(names)
    for i in range(in_flight, in_flight + 20_000):
        call_id = table.add(Waiter(i), 1.0)
        assert call_id not in names
        issued.append(call_id)
        names[call_id] = i
        live.append(call_id)
        k = rng.randrange(len(live))
        live[k], live[-1] = live[-1], live[k]
        gone = live.pop()
        assert table.pop(gone).name == names.pop(gone)
        assert table.get(gone) is None
    assert len(table) == len(names) == in_flight
    assert all(table.get(call_id).name == i for call_id, i in names.items())
    assert sum(call_id in table for call_id in issued) == in_flight


def test_deadline_order_survives_pops_in_random_order(pending: ModuleType) -> None:
    """Pops of calls not due drop the records of gone calls now and then; the order must hold."""
    rng = random.Random(5)
    table = pending.PendingCalls()
    deadlines: dict[int, float] = {}
    waiters: dict[int, Waiter] = {}
    order: dict[int, int] = {}
    for i in range(2_000):
        deadline = rng.choice([1.0, 2.0, 3.0, rng.uniform(0.0, 100.0)])
        waiter = Waiter()
        call_id = table.add(waiter, deadline)
        deadlines[call_id] = deadline
        waiters[call_id] = waiter
        order[call_id] = i
    for step, call_id in enumerate(rng.sample(sorted(waiters), 1_800)):
        assert table.pop(call_id) is waiters.pop(call_id)
        if step % 50 == 0:
            assert table.next_deadline() == min(deadlines[live] for live in waiters)
    due = sorted(waiters, key=lambda call_id: (deadlines[call_id], order[call_id]))
    assert table.expire(100.0) == [waiters[call_id] for call_id in due]


def test_a_large_table_finds_every_call(pending: ModuleType) -> None:
    rng = random.Random(3)
    table = pending.PendingCalls()
    live = {table.add(Waiter(i), float(i % 97)): i for i in range(5_000)}
    for call_id in rng.sample(sorted(live), 2_500):
        assert table.pop(call_id).name == live.pop(call_id)
    assert len(table) == len(live)
    assert all(table.get(call_id).name == i for call_id, i in live.items())
    expired = table.expire(96.0)
    assert sorted(waiter.name for waiter in expired) == sorted(live.values())
    assert [(waiter.name % 97, waiter.name) for waiter in expired] == sorted(
        (waiter.name % 97, waiter.name) for waiter in expired
    )


# --- bad arguments -----------------------------------------------------------


def test_bad_arguments(pending: ModuleType) -> None:
    table, waiters, call_ids = table_of(pending, 1.0)
    with pytest.raises(TypeError):
        table.add(None, 1.0)
    with pytest.raises(ValueError):
        table.add(Waiter(), math.nan)
    for deadline in ("1.0", b"1", None, [1.0]):
        with pytest.raises(TypeError):
            table.add(Waiter(), deadline)
    with pytest.raises(OverflowError):
        table.add(Waiter(), 10**400)
    for call_id in ("1", 1.0, None, b"\x01", [1]):
        with pytest.raises(TypeError):
            table.get(call_id)
        with pytest.raises(TypeError):
            table.pop(call_id)
        assert call_id not in table
    with pytest.raises(ValueError):
        table.expire(math.nan)
    with pytest.raises(TypeError):
        table.expire("2.0")
    with pytest.raises(TypeError):
        pending.PendingCalls(1)
    # nothing changed
    assert len(table) == 1 and table.get(call_ids[0]) is waiters[0]
    assert table.next_deadline() == 1.0 and table._bookkeeping_size == 1


# --- reentrancy --------------------------------------------------------------


class Meddler:
    """A waiter whose finalizer works the table it was in."""

    def __init__(self, table: Any, log: list[object]) -> None:
        self.table = table
        self.log = log

    def __del__(self) -> None:
        table = self.table
        call_id = table.add(Waiter("from __del__"), 0.5)
        self.log.append((len(table), table.next_deadline(), table.get(call_id).name))
        self.log.append(table.pop(call_id).name)
        self.log.append(len(table.expire(-1.0)))


def test_finalizers_that_call_back_into_the_table(pending: ModuleType) -> None:
    table = pending.PendingCalls()
    log: list[object] = []
    call_ids = [table.add(Meddler(table, log), float(i)) for i in range(6)]
    keep = table.add(Waiter("kept"), 100.0)
    table.pop(call_ids[0])  # the result dropped at once
    assert log == [(7, 0.5, "from __del__"), "from __del__", 0]
    table.expire(3.0)  # three more, dropped with the list
    assert len(log) == 12
    assert len(table) == 3
    assert table.next_deadline() == 4.0
    assert table.get(keep).name == "kept"
    del table  # the last two meddlers hold it: a cycle
    gc.collect()
    assert len(log) == 18


def test_finalizer_reentrancy_under_garbage_collection(pending: ModuleType) -> None:
    log: list[object] = []
    for _ in range(3):
        table = pending.PendingCalls()
        for i in range(50):
            table.add(Meddler(table, log), float(i))
        del table
        gc.collect()
    assert len(log) == 3 * 50 * 3


def test_a_bad_deadline_is_refused_before_a_none_waiter(pending: ModuleType) -> None:
    """Both twins check the deadline first (the compiled one converts it before its body runs)."""
    with pytest.raises(TypeError, match="real number"):
        pending.PendingCalls().add(None, "soon")
    with pytest.raises(ValueError, match="NaN"):
        pending.PendingCalls().add(None, float("nan"))
