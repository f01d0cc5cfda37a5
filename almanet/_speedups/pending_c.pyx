# cython: language_level=3
"""The table of calls awaiting replies, compiled (twin of ``pending_py.py``, which documents the API).

Call ids are found in an open-addressing hash table (linear probing,
Fibonacci hashing, load at most 1/2, backward-shift deletion so there are no
tombstones). Its slots are a C array of call ids (0 marks an empty slot: call
ids start at 1) and, at the same positions, a Python list of waiters (None in
an empty slot): the list keeps the waiters visible to the garbage collector,
which must see them to collect a cycle through a waiter and its session.
Deadlines are a C binary heap of (deadline, call id) records with lazy
deletion, as in the pure twin: a popped call leaves its record behind until it
reaches the top or the records of gone calls outnumber the calls; telling a
gone call's record from a live one is a lookup in the C table.

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

from types import GenericAlias

from almanet._speedups.pending_py import __all__  # the same API, by construction


cdef extern from "Python.h":
    # Declared here without an exception clause: the caller checks.
    unsigned long long long_as_uint64 "PyLong_AsUnsignedLongLong" (object)


cdef struct DeadlineRecord:
    double deadline
    uint64_t call_id


cdef enum:
    # Kept allocated however small the table gets, so a session with a call
    # or two in flight does not allocate on every call.
    MIN_SLOTS = 16
    MIN_RECORDS = 16


cdef uint64_t FIBONACCI = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads consecutive ids


cdef inline bint earlier(const DeadlineRecord* a, const DeadlineRecord* b) noexcept nogil:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.call_id < b.call_id)


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
    cdef uint64_t* _ids  # hash slots: a call id, or 0
    cdef list _waiters  # hash slots: the waiter of the call at the same position, or None
    cdef Py_ssize_t _slot_count  # a power of two
    cdef int _hash_shift  # 64 - log2(_slot_count)
    cdef Py_ssize_t _count
    cdef DeadlineRecord* _records  # a binary min-heap of _size records
    cdef Py_ssize_t _size
    cdef Py_ssize_t _capacity
    cdef uint64_t _last_id

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
        free(self._ids)
        free(self._records)

    def add(self, waiter, double deadline):
        if isnan(deadline):
            raise ValueError("a deadline cannot be NaN")
        if waiter is None:
            raise TypeError("a waiter cannot be None")
        if 2 * (self._count + 1) > self._slot_count:
            self._rehash(2 * self._slot_count)
        if self._size == self._capacity:
            self._grow_records()
        call_id = PyLong_FromUnsignedLongLong(self._last_id + 1)
        self._last_id += 1
        cdef Py_ssize_t slot = self._empty_slot(self._last_id)
        self._waiters[slot] = waiter
        self._ids[slot] = self._last_id
        self._count += 1
        self._push(deadline, self._last_id)
        return call_id

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
            slot = self._find(self._records[0].call_id)
            self._pop_top()
            if slot >= 0:
                expired.append(self._remove(slot))
        if self._size > 2 * self._count:
            self._drop_gone_records()
        else:
            self._release_spare_records()
        return expired

    def next_deadline(self):
        while self._size and self._find(self._records[0].call_id) < 0:
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

    cdef Py_ssize_t _find(self, uint64_t call_id) noexcept:
        """The slot of ``call_id``, or -1."""
        if call_id == 0:  # marks empty slots, and stands for ints that are no call id
            return -1
        cdef Py_ssize_t slot = self._home(call_id)
        while self._ids[slot] != call_id:
            if self._ids[slot] == 0:
                return -1
            slot = (slot + 1) & (self._slot_count - 1)
        return slot

    cdef Py_ssize_t _empty_slot(self, uint64_t call_id) noexcept:
        """Where ``call_id``, not in the table, goes (there is an empty slot: the load is at most 1/2)."""
        cdef Py_ssize_t slot = self._home(call_id)
        while self._ids[slot]:
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
            if self._ids[next_slot] == 0:
                break
            home = self._home(self._ids[next_slot])
            if ((next_slot - home) & mask) >= ((next_slot - hole) & mask):
                self._ids[hole] = self._ids[next_slot]
                self._waiters[hole] = self._waiters[next_slot]
                hole = next_slot
        self._ids[hole] = 0
        self._waiters[hole] = None
        self._count -= 1
        return waiter

    cdef int _rehash(self, Py_ssize_t slot_count) except -1:
        """Move the calls to a new table of ``slot_count`` slots (a power of two)."""
        if slot_count > PY_SSIZE_T_MAX // <Py_ssize_t>sizeof(uint64_t):
            raise MemoryError("too many pending calls")
        cdef list waiters = [None] * slot_count
        cdef uint64_t* ids = <uint64_t*>calloc(slot_count, sizeof(uint64_t))
        if ids is NULL:
            raise MemoryError()
        cdef uint64_t* old_ids = self._ids
        cdef list old_waiters = self._waiters
        cdef Py_ssize_t old_slot_count = self._slot_count
        self._ids = ids
        self._waiters = waiters
        self._slot_count = slot_count
        self._hash_shift = 64
        while slot_count > 1:
            slot_count >>= 1
            self._hash_shift -= 1
        cdef Py_ssize_t old_slot, slot
        for old_slot in range(old_slot_count):
            if old_ids[old_slot]:
                slot = self._empty_slot(old_ids[old_slot])
                ids[slot] = old_ids[old_slot]
                waiters[slot] = old_waiters[old_slot]
        free(old_ids)
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

    cdef void _push(self, double deadline, uint64_t call_id) noexcept:
        # The caller made room for one more record.
        cdef DeadlineRecord record
        record.deadline = deadline
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
            if self._find(self._records[i].call_id) >= 0:
                self._records[kept] = self._records[i]
                kept += 1
        self._size = kept
        i = kept // 2
        while i > 0:
            i -= 1
            self._sift_down(i)
        self._release_spare_records()
