"""The table of calls awaiting replies, pure Python (twin of ``pending_c.pyx``).

A session adds a waiter (a future, or a collector for a multicall) with the
deadline of its call and puts the call id it gets back into the invocation. A
reply resolves its call by id (``pop``); a cancelled call is ``pop``-ed too.
The session keeps one timer, set to ``next_deadline()``, which calls
``expire(now)`` to take every call that ran out of time: there is no timer per
call. The table only stores and returns waiters: it never resolves them, never
touches the event loop, and never compares or hashes them.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

__all__ = ["PendingCalls"]

Waiter = TypeVar("Waiter")


class PendingCalls(Generic[Waiter]):
    """Call id -> waiter, each with a deadline.

    Call ids are 1, 2, 3, ... in the order of ``add``, never reused within a
    table. A deadline is a time on the clock the caller passes to ``expire``
    (event-loop time). ``get``, ``pop`` and ``in`` are O(1); ``add`` is
    O(log n); ``expire`` is O(k log n) for the k calls it takes.
    """

    __slots__ = ("_deadlines", "_last_id", "_waiters")

    def __init__(self) -> None:
        self._waiters: dict[int, Waiter] = {}
        # A heap of (deadline, call id). A call that leaves by ``pop`` keeps
        # its record here until the record reaches the top or the records of
        # gone calls outnumber the calls in the table; then they are dropped.
        self._deadlines: list[tuple[float, int]] = []
        self._last_id = 0

    def add(self, waiter: Waiter, deadline: float) -> int:
        """Store ``waiter`` until ``deadline``; return its new call id.

        Raises ``TypeError`` for a ``None`` waiter (``None`` is what ``get``
        and ``pop`` return for no call) or a deadline that is not a real
        number, ``ValueError`` for a NaN deadline.
        """
        # The deadline first, as the compiled twin converts it before its body runs.
        if math.isnan(deadline):  # also refuses what is not a real number, as the compiled twin does
            raise ValueError("a deadline cannot be NaN")
        if waiter is None:
            raise TypeError("a waiter cannot be None")
        # uint64 in the compiled twin: at a billion calls a second it would last 584 years.
        self._last_id = call_id = self._last_id + 1
        self._waiters[call_id] = waiter
        heapq.heappush(self._deadlines, (float(deadline), call_id))
        return call_id

    def get(self, call_id: int) -> Waiter | None:
        """The waiter of call ``call_id``, or ``None`` if the table has no such call."""
        if type(call_id) is not int:
            call_id = _plain_int(call_id)
        return self._waiters.get(call_id)

    def pop(self, call_id: int) -> Waiter | None:
        """Remove call ``call_id`` and return its waiter, or ``None`` if the table has no such call."""
        if type(call_id) is not int:
            call_id = _plain_int(call_id)
        waiter = self._waiters.pop(call_id, None)
        if len(self._deadlines) > 2 * len(self._waiters):
            self._drop_gone_records()
        return waiter

    def expire(self, now: float) -> list[Waiter]:
        """Remove and return the waiters whose deadline is ``now`` or earlier.

        Earliest deadline first; calls with the same deadline in the order
        they were added. Raises ``ValueError`` for a NaN ``now``.
        """
        if math.isnan(now):
            raise ValueError("now cannot be NaN")
        expired = []
        deadlines = self._deadlines
        waiters = self._waiters
        while deadlines and deadlines[0][0] <= now:
            _, call_id = heapq.heappop(deadlines)
            waiter = waiters.pop(call_id, None)
            if waiter is not None:
                expired.append(waiter)
        if len(deadlines) > 2 * len(waiters):
            self._drop_gone_records()
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline of the calls in the table, or ``None`` if it is empty."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._waiters:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, call_id: object) -> bool:
        return isinstance(call_id, int) and _plain_int(call_id) in self._waiters

    @property
    def _bookkeeping_size(self) -> int:
        """Deadline records held, those of gone calls included (for tests)."""
        return len(self._deadlines)

    def _drop_gone_records(self) -> None:
        # Rebuilt when gone records outnumber live ones: amortized O(1) per pop.
        waiters = self._waiters
        self._deadlines = [record for record in self._deadlines if record[1] in waiters]
        heapq.heapify(self._deadlines)


def _plain_int(call_id: object) -> int:
    """``call_id`` as a plain int, so an int subclass is looked up by its value alone (never by its ``__hash__``)."""
    if isinstance(call_id, int):
        return int.__index__(call_id)
    raise TypeError(f"a call id must be an int, not {type(call_id).__name__}")
