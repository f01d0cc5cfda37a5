"""The table of calls awaiting replies, pure Python (twin of ``pending_c.pyx``).

A session adds a waiter (a future, or a collector for a multicall) with the
deadline of its call and puts the call id it gets back into the invocation. A
reply resolves its call by id (``pop``); a cancelled call is ``pop``-ed too.
The session keeps one timer, set to ``next_deadline()``, which calls
``expire(now)`` to take every call that ran out of time: there is no timer per
call. The table only stores and returns waiters: it never resolves them, never
touches the event loop, and never compares or hashes them.

Call ids are random, so that whoever can publish to a session's reply topic
cannot answer a call by guessing its id. They come from the operating system's
CSPRNG (``os.urandom``), 512 at a time, in a buffer that every table of the
process draws from; a forked child drops what it inherited of the buffer, so
that it never issues its parent's ids.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Container, Iterator
from typing import Generic, TypeVar

__all__ = ["PendingCalls"]

Waiter = TypeVar("Waiter")

# Drawn from the OS at a time: 4 KiB. Every id costs 8 bytes of the OS's
# randomness whatever the batch; the batch only spreads the cost of the call.
_IDS_PER_DRAW = 512

# The ids drawn and not issued yet, shared by the tables of the process.
# ``next`` on it is atomic under the GIL, so two threads never take one id.
_random_ids: Iterator[int] = iter(())


def _draw_call_id(taken: Container[int]) -> int:
    """A random call id: not 0, not in ``taken``; from the OS when the buffer is used up."""
    global _random_ids
    while True:
        for call_id in _random_ids:
            if call_id and call_id not in taken:
                return call_id
        # Native 8-byte unsigned ints: the order of the bytes does not matter, they are random.
        _random_ids = iter(memoryview(os.urandom(8 * _IDS_PER_DRAW)).cast("Q"))


def _forget_random_ids() -> None:
    """Drop the ids drawn and not issued (in a forked child: its parent issues them)."""
    global _random_ids
    _random_ids = iter(())


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_random_ids)


class PendingCalls(Generic[Waiter]):
    """Call id -> waiter, each with a deadline.

    A call id is an int drawn uniformly at random from 1 .. 2**64 - 1 by the
    OS's CSPRNG, unique among the calls in the table: knowing some ids tells
    nothing about the others. The id of a gone call is as unlikely to come
    back as any other (1 in 2**64 per ``add``). A deadline is a time on the
    clock the caller passes to ``expire`` (event-loop time). ``get``, ``pop``
    and ``in`` are O(1); ``add`` is O(log n); ``expire`` is O(k log n) for the
    k calls it takes.
    """

    __slots__ = ("_added", "_count", "_deadlines", "_waiters")

    def __init__(self) -> None:
        # Call id -> waiter; a call that left by ``pop`` stays, with None,
        # while its deadline record does, so that its id is not issued again
        # before the record is gone.
        self._waiters: dict[int, Waiter | None] = {}
        self._count = 0  # calls in the table (ids with a waiter)
        self._added = 0  # calls added: the order of the last one
        # A heap of (deadline, order, call id): the order (of ``add``) ranks
        # equal deadlines. A call that leaves by ``pop`` keeps its record here
        # until the record reaches the top or the records of gone calls
        # outnumber the calls in the table; then they are dropped.
        self._deadlines: list[tuple[float, int, int]] = []

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
        waiters = self._waiters
        call_id = next(_random_ids, 0)
        if not call_id or call_id in waiters:  # the buffer is used up, or (1 in 2**64) 0 or an id in use
            call_id = _draw_call_id(waiters)
        self._added = order = self._added + 1
        self._count += 1
        waiters[call_id] = waiter
        heapq.heappush(self._deadlines, (float(deadline), order, call_id))
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
        waiters = self._waiters
        waiter = waiters.get(call_id)
        if waiter is not None:
            waiters[call_id] = None  # until its deadline record goes
            self._count -= 1
            if len(self._deadlines) > 2 * self._count:
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
            waiter = waiters.pop(heapq.heappop(deadlines)[2])
            if waiter is not None:
                expired.append(waiter)
        self._count -= len(expired)
        if len(deadlines) > 2 * self._count:
            self._drop_gone_records()
        return expired

    def items(self) -> list[tuple[int, Waiter]]:
        """(call id, waiter) of every call in the table, in no particular order; O(n), for rare sweeps."""
        return [(call_id, waiter) for call_id, waiter in self._waiters.items() if waiter is not None]

    def next_deadline(self) -> float | None:
        """The earliest deadline of the calls in the table, or ``None`` if it is empty."""
        deadlines = self._deadlines
        waiters = self._waiters
        while deadlines and waiters[deadlines[0][2]] is None:
            del waiters[heapq.heappop(deadlines)[2]]
        return deadlines[0][0] if deadlines else None

    def __len__(self) -> int:
        return self._count

    def __contains__(self, call_id: object) -> bool:
        return isinstance(call_id, int) and self._waiters.get(_plain_int(call_id)) is not None

    @property
    def _bookkeeping_size(self) -> int:
        """Deadline records held, those of gone calls included (for tests)."""
        return len(self._deadlines)

    def _drop_gone_records(self) -> None:
        # Rebuilt when gone records outnumber live ones: amortized O(1) per pop.
        waiters = self._waiters
        kept = []
        for record in self._deadlines:
            if waiters[record[2]] is None:
                del waiters[record[2]]
            else:
                kept.append(record)
        heapq.heapify(kept)
        self._deadlines = kept


def _plain_int(call_id: object) -> int:
    """``call_id`` as a plain int, so an int subclass is looked up by its value alone (never by its ``__hash__``)."""
    if isinstance(call_id, int):
        return int.__index__(call_id)
    raise TypeError(f"a call id must be an int, not {type(call_id).__name__}")
