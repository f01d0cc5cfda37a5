# cython: language_level=3
"""The table of calls awaiting replies, compiled (twin of ``pending_py.py``, which documents the API).

Call ids are random: they come from ``os.urandom``, 512 at a time (4 KiB),
copied into a C buffer that every table of the process draws from; a forked
child drops what it inherited of the buffer (``os.register_at_fork``), so that
it never issues its parent's ids. Reading the buffer is bounds-checked.

Call ids are found in an open-addressing hash table (linear probing,
Fibonacci hashing, load at most 1/2, backward-shift deletion so there are no
tombstones). Its slots are a C array of (call id, order) (call id 0 marks an
empty slot: 0 is never issued; the order is the call's place in the order of
``add``) and, at the same positions, a Python list of waiters (None in an empty
slot): the list keeps the waiters visible to the garbage collector, which must
see them to collect a cycle through a waiter and its session. Deadlines are a
C binary heap of (deadline, order, call id) records with lazy deletion, as in
the pure twin: a popped call leaves its record behind until it reaches the top
or the records of gone calls outnumber the calls; a record is a live call's if
the C table has its call id with its order (a call that got the id of a gone
call by chance has another order).

Reentrancy: the table never drops the last reference to a waiter while it is
changing itself: ``pop`` and ``expire`` hand their references to the caller,
so a waiter's ``__del__`` runs when the table is consistent again. List
accesses are bounds-checked.
"""

cimport cython
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.math cimport isnan
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

import os
from types import GenericAlias

from almanet._speedups.pending_py import __all__  # the same API, by construction


cdef extern from "Python.h":
    # Declared here without an exception clause: the caller checks.
    unsigned long long long_as_uint64 "PyLong_AsUnsignedLongLong" (object)


cdef struct Slot:
    uint64_t call_id  # 0: an empty slot
    uint64_t order


cdef struct DeadlineRecord:
    double deadline
    uint64_t order  # ties between equal deadlines go to the call added first
    uint64_t call_id


cdef enum:
    # Kept allocated however small the table gets, so a session with a call
    # or two in flight does not allocate on every call.
    MIN_SLOTS = 16
    MIN_RECORDS = 16
    IDS_PER_DRAW = 512  # call ids drawn from the OS at a time


# Random ids are uniform already, so the home slot could be their top bits;
# the multiplication (a bijection) costs next to nothing and keeps the table
# sound whatever the ids.
cdef uint64_t FIBONACCI = 0x9E3779B97F4A7C15  # 2**64 / golden ratio


cdef inline bint earlier(const DeadlineRecord* a, const DeadlineRecord* b) noexcept nogil:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.order < b.order)


# --- random call ids ----------------------------------------------------------

# The ids drawn and not issued yet are random_ids[random_ids_used:], shared by
# the tables of the process. Not thread-safe by itself: the GIL is held from
# the check of random_ids_used to its increment.
cdef uint64_t random_ids[IDS_PER_DRAW]
cdef size_t random_ids_used = IDS_PER_DRAW  # all used: the first add draws


cdef int draw_random_ids() except -1:
    """Fill the buffer from the OS's CSPRNG."""
    global random_ids_used
    # os.urandom lets other threads run; they may draw too, which is no harm.
    cdef bytes drawn = os.urandom(sizeof(random_ids))
    if len(drawn) != sizeof(random_ids):  # never, unless os.urandom is replaced
        raise RuntimeError("os.urandom returned the wrong number of bytes")
    memcpy(random_ids, <const char*>drawn, sizeof(random_ids))
    random_ids_used = 0
    return 0


def _forget_random_ids():
    """Drop the ids drawn and not issued (in a forked child: its parent issues them)."""
    global random_ids_used
    memset(random_ids, 0, sizeof(random_ids))
    random_ids_used = IDS_PER_DRAW


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_random_ids)


cdef uint64_t as_call_id(call_id) except? 0:
    """The call id an int stands for; 0 (no call) for an int outside uint64."""
    if not isinstance(call_id, int):
        raise TypeError(f"a call id must be an int, not {type(call_id).__name__}")
    cdef uint64_t value = long_as_uint64(call_id)
    if value == <uint64_t>-1 and PyErr_Occurred():
        PyErr_Clear()  # OverflowError: negative, or above 2**64 - 1
        return 0
    return value


@cython.final
@cython.wraparound(False)
# Without tp_clear the waiters' list stays in place until the table is freed;
# the collector breaks a cycle through the table at the list or the waiters.
@cython.no_gc_clear
cdef class PendingCalls:
    cdef Slot* _slots  # hash slots: a call id (0: none) and its order
    cdef list _waiters  # hash slots: the waiter of the call at the same position, or None
    cdef Py_ssize_t _slot_count  # a power of two
    cdef int _hash_shift  # 64 - log2(_slot_count)
    cdef Py_ssize_t _count
    cdef DeadlineRecord* _records  # a binary min-heap of _size records
    cdef Py_ssize_t _size
    cdef Py_ssize_t _capacity
    cdef uint64_t _added  # calls added: the order of the last one (at a billion a second, 584 years)

    # Generic, as mypy is told: ``PendingCalls[Future[Any]]()`` is a table (the argument is not checked).
    __class_getitem__ = classmethod(GenericAlias)

    def __cinit__(self):
        self._rehash(MIN_SLOTS)
        self._records = <DeadlineRecord*>malloc(MIN_RECORDS * sizeof(DeadlineRecord))
        if self._records is NULL:
            raise MemoryError()
        self._capacity = MIN_RECORDS

    def __init__(self):
        pass  # refuses arguments, as the pure twin does: ``__cinit__`` alone would ignore them

    def __dealloc__(self):
        free(self._slots)
        free(self._records)

    def add(self, waiter, double deadline):
        if isnan(deadline):
            raise ValueError("a deadline cannot be NaN")
        if waiter is None:
            raise TypeError("a waiter cannot be None")
        global random_ids_used
        cdef uint64_t call_id
        cdef Py_ssize_t slot
        # Each step that runs Python code starts the checks over: a rehash
        # may collect garbage (finalizers may add and pop), a draw lets other
        # threads run. From the last check to the end, none runs.
        while True:
            if 2 * (self._count + 1) > self._slot_count:
                self._rehash(2 * self._slot_count)
                continue
            if random_ids_used >= IDS_PER_DRAW:
                draw_random_ids()
                continue
            call_id = random_ids[random_ids_used]
            random_ids_used += 1
            if call_id == 0:  # 1 in 2**64: draw again
                continue
            slot = self._probe(call_id)
            if self._slots[slot].call_id == 0:  # else (1 in 2**64 per call) it is taken: draw again
                break
        if self._size == self._capacity:
            self._grow_records()
        result = PyLong_FromUnsignedLongLong(call_id)
        self._added += 1
        self._waiters[slot] = waiter
        self._slots[slot].call_id = call_id
        self._slots[slot].order = self._added
        self._count += 1
        self._push(deadline, self._added, call_id)
        return result

    def get(self, call_id):
        cdef Py_ssize_t slot = self._find(as_call_id(call_id))
        return self._waiters[slot] if slot >= 0 else None

    def pop(self, call_id):
        cdef Py_ssize_t slot = self._find(as_call_id(call_id))
        if slot < 0:
            return None
        waiter = self._remove(slot)
        if self._size > 2 * self._count:
            self._drop_gone_records()
        return waiter

    def expire(self, double now):
        if isnan(now):
            raise ValueError("now cannot be NaN")
        cdef list expired = []
        cdef Py_ssize_t slot
        while self._size and self._records[0].deadline <= now:
            slot = self._find_record(&self._records[0])
            self._pop_top()
            if slot >= 0:
                expired.append(self._remove(slot))
        if self._size > 2 * self._count:
            self._drop_gone_records()
        else:
            self._release_spare_records()
        return expired

    def items(self):
        cdef list items = []
        cdef Py_ssize_t slot
        for slot in range(self._slot_count):
            if self._slots[slot].call_id:
                items.append((self._slots[slot].call_id, self._waiters[slot]))
        return items

    def next_deadline(self):
        while self._size and self._find_record(&self._records[0]) < 0:
            self._pop_top()
        return self._records[0].deadline if self._size else None

    def __len__(self):
        return self._count

    def __contains__(self, call_id):
        return isinstance(call_id, int) and self._find(as_call_id(call_id)) >= 0

    @property
    def _bookkeeping_size(self):
        return self._size

    # --- the hash table -----------------------------------------------------

    cdef inline Py_ssize_t _home(self, uint64_t call_id) noexcept:
        return <Py_ssize_t>((call_id * FIBONACCI) >> self._hash_shift)

    cdef Py_ssize_t _probe(self, uint64_t call_id) noexcept:
        """The slot of ``call_id`` (not 0) if it is in the table, else the empty slot where it would go."""
        cdef Py_ssize_t slot = self._home(call_id)
        cdef uint64_t found
        while True:
            found = self._slots[slot].call_id
            if found == call_id or found == 0:
                return slot
            slot = (slot + 1) & (self._slot_count - 1)

    cdef Py_ssize_t _find(self, uint64_t call_id) noexcept:
        """The slot of ``call_id``, or -1."""
        if call_id == 0:  # marks empty slots, and stands for ints that are no call id
            return -1
        cdef Py_ssize_t slot = self._probe(call_id)
        return slot if self._slots[slot].call_id else -1

    cdef Py_ssize_t _find_record(self, const DeadlineRecord* record) noexcept:
        """The slot of the call ``record`` is for, or -1 if that call is gone."""
        cdef Py_ssize_t slot = self._find(record.call_id)
        if slot >= 0 and self._slots[slot].order != record.order:
            return -1  # a later call that got the same id
        return slot

    cdef Py_ssize_t _empty_slot(self, uint64_t call_id) noexcept:
        """Where ``call_id``, not in the table, goes (there is an empty slot: the load is at most 1/2)."""
        cdef Py_ssize_t slot = self._home(call_id)
        while self._slots[slot].call_id:
            slot = (slot + 1) & (self._slot_count - 1)
        return slot

    cdef object _remove(self, Py_ssize_t slot):
        """Empty ``slot`` and return its waiter (the caller's reference from then on)."""
        cdef Py_ssize_t mask = self._slot_count - 1
        cdef Py_ssize_t hole = slot
        cdef Py_ssize_t next_slot = slot
        cdef Py_ssize_t home
        waiter = self._waiters[slot]
        # Backward shift: the entries after the hole in its probe run move
        # back into it unless that would put them before their home slot.
        while True:
            next_slot = (next_slot + 1) & mask
            if self._slots[next_slot].call_id == 0:
                break
            home = self._home(self._slots[next_slot].call_id)
            if ((next_slot - home) & mask) >= ((next_slot - hole) & mask):
                self._slots[hole] = self._slots[next_slot]
                self._waiters[hole] = self._waiters[next_slot]
                hole = next_slot
        self._slots[hole].call_id = 0
        self._slots[hole].order = 0
        self._waiters[hole] = None
        self._count -= 1
        return waiter

    cdef int _rehash(self, Py_ssize_t slot_count) except -1:
        """Move the calls to a new table of ``slot_count`` slots (a power of two)."""
        if slot_count > PY_SSIZE_T_MAX // <Py_ssize_t>sizeof(Slot):
            raise MemoryError("too many pending calls")
        cdef list waiters = [None] * slot_count
        cdef Slot* slots = <Slot*>calloc(slot_count, sizeof(Slot))
        if slots is NULL:
            raise MemoryError()
        cdef Slot* old_slots = self._slots
        cdef list old_waiters = self._waiters
        cdef Py_ssize_t old_slot_count = self._slot_count
        self._slots = slots
        self._waiters = waiters
        self._slot_count = slot_count
        self._hash_shift = 64
        while slot_count > 1:
            slot_count >>= 1
            self._hash_shift -= 1
        cdef Py_ssize_t old_slot, slot
        for old_slot in range(old_slot_count):
            if old_slots[old_slot].call_id:
                slot = self._empty_slot(old_slots[old_slot].call_id)
                slots[slot] = old_slots[old_slot]
                waiters[slot] = old_waiters[old_slot]
        free(old_slots)
        return 0

    # --- the deadline heap --------------------------------------------------

    cdef int _grow_records(self) except -1:
        if self._capacity > PY_SSIZE_T_MAX // 2 // <Py_ssize_t>sizeof(DeadlineRecord):
            raise MemoryError("too many pending calls")
        cdef DeadlineRecord* records = <DeadlineRecord*>realloc(
            self._records, 2 * self._capacity * sizeof(DeadlineRecord)
        )
        if records is NULL:
            raise MemoryError()
        self._records = records
        self._capacity *= 2
        return 0

    cdef void _release_spare_records(self) noexcept:
        cdef Py_ssize_t capacity = max(MIN_RECORDS, 2 * self._size)
        if self._capacity <= 2 * capacity:
            return
        cdef DeadlineRecord* records = <DeadlineRecord*>realloc(self._records, capacity * sizeof(DeadlineRecord))
        if records is not NULL:  # else the larger block still holds the heap
            self._records = records
            self._capacity = capacity

    cdef void _push(self, double deadline, uint64_t order, uint64_t call_id) noexcept:
        # The caller made room for one more record.
        cdef DeadlineRecord record
        record.deadline = deadline
        record.order = order
        record.call_id = call_id
        cdef Py_ssize_t i = self._size
        cdef Py_ssize_t parent
        self._size += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not earlier(&record, &self._records[parent]):
                break
            self._records[i] = self._records[parent]
            i = parent
        self._records[i] = record

    cdef void _pop_top(self) noexcept:
        # The caller checked that the heap is not empty.
        self._size -= 1
        if self._size:
            self._records[0] = self._records[self._size]
            self._sift_down(0)

    cdef void _sift_down(self, Py_ssize_t i) noexcept:
        cdef DeadlineRecord record = self._records[i]
        cdef Py_ssize_t child
        while True:
            child = 2 * i + 1
            if child >= self._size:
                break
            if child + 1 < self._size and earlier(&self._records[child + 1], &self._records[child]):
                child += 1
            if not earlier(&self._records[child], &record):
                break
            self._records[i] = self._records[child]
            i = child
        self._records[i] = record

    cdef void _drop_gone_records(self) noexcept:
        # Rebuilt when gone records outnumber live ones: amortized O(1) per pop.
        cdef Py_ssize_t kept = 0
        cdef Py_ssize_t i
        for i in range(self._size):
            if self._find_record(&self._records[i]) >= 0:
                self._records[kept] = self._records[i]
                kept += 1
        self._size = kept
        i = kept // 2
        while i > 0:
            i -= 1
            self._sift_down(i)
        self._release_spare_records()
