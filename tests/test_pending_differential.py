"""Both pending-call tables and a plain model run the same random operations and must agree.

Deadlines and times come from a small set, so that equal deadlines, expiry
exactly at a deadline and infinities are common; call ids are issued ones
(live or gone), never issued ones and ints outside uint64.

The tables issue random ids, each its own; the model issues 1, 2, 3... An
issued call is known by its place in the order of ``add`` (its model id), and
each table is given the id it issued for it.
"""

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from helpers import load_twin

TIMES = [-math.inf, -1.0, -0.0, 0.0, 1.0, 2.0, 3.0, 1e9, math.inf]
UNISSUED_IDS = [0, -1, 10_000, 2**64 - 1, 2**64, -(2**64), 10**30]


@dataclass(frozen=True)
class Issued:
    """The ``number``-th call added (from 1): its model id."""

    number: int


class Model:
    """The pending-call table as plainly as it can be said (but for random ids)."""

    def __init__(self) -> None:
        self.calls: dict[int, tuple[float, object]] = {}
        self.last_id = 0

    def add(self, waiter: object, deadline: float) -> int:
        self.last_id += 1
        self.calls[self.last_id] = (deadline, waiter)
        return self.last_id

    def get(self, call_id: int) -> object | None:
        call = self.calls.get(call_id)
        return None if call is None else call[1]

    def pop(self, call_id: int) -> object | None:
        call = self.calls.pop(call_id, None)
        return None if call is None else call[1]

    def expire(self, now: float) -> list[object]:
        due = sorted((deadline, call_id) for call_id, (deadline, _) in self.calls.items() if deadline <= now)
        return [self.calls.pop(call_id)[1] for _, call_id in due]

    def next_deadline(self) -> float | None:
        return min((deadline for deadline, _ in self.calls.values()), default=None)

    def __len__(self) -> int:
        return len(self.calls)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self.calls


class TablesAgree(RuleBasedStateMachine):
    issued = Bundle("issued")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.tables = [load_twin("pending", "py").PendingCalls(), load_twin("pending", "c").PendingCalls()]
        # Per table: the id it issued for each call, in the order of ``add``.
        self.ids: list[list[int]] = [[] for _ in self.tables]

    def each(self, operation: str, *arguments: Any) -> Any:
        """Run the operation on the model and both tables; the results must agree."""
        expected = getattr(self.model, operation)(*self.for_model(arguments))
        for table, ids in zip(self.tables, self.ids, strict=True):
            result = getattr(table, operation)(*self.for_table(arguments, ids))
            if operation == "add":
                assert type(result) is int and 0 < result < 2**64
                assert result not in {ids[number - 1] for number in self.model.calls if number <= len(ids)}
                ids.append(result)
                continue
            assert result == expected, (type(table).__module__, operation, arguments)
            if operation == "expire":
                assert all(a is b for a, b in zip(result, expected, strict=True))
            elif operation in ("get", "pop"):
                assert result is expected
        return expected

    @staticmethod
    def for_model(arguments: tuple[Any, ...]) -> list[Any]:
        return [argument.number if isinstance(argument, Issued) else argument for argument in arguments]

    @staticmethod
    def for_table(arguments: tuple[Any, ...], ids: list[int]) -> list[Any]:
        return [ids[argument.number - 1] if isinstance(argument, Issued) else argument for argument in arguments]

    @rule(target=issued, deadline=st.sampled_from(TIMES))
    def add(self, deadline: float) -> Issued:
        return Issued(self.each("add", object(), deadline))

    @rule(call_id=st.one_of(issued, st.sampled_from(UNISSUED_IDS)))
    def get(self, call_id: Issued | int) -> None:
        self.each("get", call_id)

    @rule(call_id=st.one_of(issued, st.sampled_from(UNISSUED_IDS)))
    def pop(self, call_id: Issued | int) -> None:
        self.each("pop", call_id)

    @rule(call_id=st.one_of(issued, st.sampled_from(UNISSUED_IDS)))
    def contains(self, call_id: Issued | int) -> None:
        self.each("__contains__", call_id)

    @rule(now=st.sampled_from(TIMES))
    def expire(self, now: float) -> None:
        self.each("expire", now)

    @rule()
    def next_deadline(self) -> None:
        self.each("next_deadline")

    @invariant()
    def same_length_and_bounded_bookkeeping(self) -> None:
        for table in self.tables:
            assert len(table) == len(self.model)
            assert table._bookkeeping_size <= 2 * len(table)


TablesAgree.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_twins_and_model_agree = TablesAgree.TestCase
