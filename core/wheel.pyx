# cython: language_level=3, cdivision=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""A hierarchical timing wheel for int64 keys.

Geometry
--------
Time is counted in ticks of ``tick_ms`` (1 ms by default). A tick number is 64 bits wide and
the wheel reads it as eight 8-bit digits: level ``k`` of the wheel has 256 slots, one per value
of digit ``k``, and a slot of level ``k`` spans 256**k ticks::

    level 0   256 slots x 1 tick        covers 256 ms  (at 1 ms)
    level 1   256 slots x 256 ticks     covers 65.5 s
    level 2   256 slots x 65536 ticks   covers 4.66 h
    level 3   ...                       covers 49.7 days
    level 4-7 ...                       cover the rest of the int64 range, so there is no
                                        "overflow wheel" to create lazily, as Kafka does.

A timer due at tick ``d`` while the wheel stands at tick ``c`` lives at the level of the most
significant digit in which ``d`` and ``c`` differ (``d XOR c``), in the slot named by ``d``'s
digit at that level. So level 0 holds the rest of the current 256-tick block, level 1 the rest
of the current 65536-tick block, and so on: placement is a pure function of (deadline, wheel
time), the rule of the pre-2016 Linux kernel wheel with cascading. Negative times work because
ticks are mapped to uint64 by flipping the sign bit, which keeps their order.

Worked example (tick 1 ms, wheel at 1000, a timer due at 70000; digits in hex):
    1000 = 00|03|e8 and 70000 = 01|11|70 first differ in digit 2, so the timer sits at level
    2, slot 0x01. When the wheel reaches 01|00|00 = 65536 it cascades that slot: now the two
    first differ in digit 1, so the timer moves to level 1, slot 0x11. At 01|11|00 = 69888
    that slot cascades and the timer lands in level 0, slot 0x70, which fires when the wheel
    reaches 01|11|70 = 70000. Every timer cascades at most once per level it started above
    level 0, however long it waits.

Why 256 slots at level 0: a cascade costs one table probe per timer, so a wider level 0 looks
cheaper, but measured it is not. With 4096 slots a cascade scatters ~1 MB of appends that have
gone cold by the time they fire; with 256, everything level 0 holds was written in the last
256 ticks and is still in L2 (1M timers over 60 s: 8.0-10.8 M/s vs 7.6-8.0 M/s, same runs).

Storage
-------
A slot is a growable array of 16-byte (key, deadline) entries in insertion order; timers hold
no pointers and there is no Python object per timer. A key -> (slot, position) hash table
(open addressing, robin hood, 8-byte buckets that also hold a 12-bit tag of the key's hash and
the probe distance) makes a key findable. Cancelling a key only deletes its bucket: the entry
left behind is stale, and every walk over a slot asks the table whether (slot, position) is
still live. A slot holding 64 or more stale entries, and more stale than live ones, is
compacted (a batch compacts once, at its end), so stale entries never cost more than live ones.
A table that passes 80 % load doubles. One of 65,536 buckets or more doubles a few buckets at
a time: the new table takes every insert, the old one is emptied from its first bucket on, a
run of buckets at a time (MOVE_PER_CALL buckets a schedule or cancel, MOVE_PER_ADVANCE an
advance), and a key found in the old table meanwhile is moved on the spot, so every index a
method holds is the new table's. Lookups ask both tables until the old one is empty. Growing
whole in one call rehashed every key, reading it from its entry (a cache miss apiece): it
stalled the timer's event loop 13.7 ms at 210K timers, and schedule_many of 512 keys took up
to 30-49 ms at 839K (perf/bench_core.py, 2-core test VM); a few buckets a call, the longest
such call took 2.5-2.9 ms, for 147-153 ns a key over a growth to 1.1M instead of 104-116 (two
tables to probe and a bucket moved one at a time cost more than one rehash). A new
table's memory is zero pages from mmap (tw_table_alloc), so no memset lands in one call
either. A growth asked for while one is under way, and every shrink, rebuild whole (and
finish the move). ``_set_move_min(16)`` makes every growth incremental, which the model tests
use.
Memory is 16 bytes per entry plus 10-20 bytes of table per timer. Every operation is bound by
one random access to the table; walks over a slot and batch calls prefetch the buckets
TW_PREFETCH_AHEAD (32) entries ahead, and lookups by key prefetch the entry a bucket names too.

Order of firing: ``advance`` returns keys ordered by deadline, then by the order of the
``schedule`` calls that set them. Timers with equal deadlines always share one slot and move
together, so a slot's insertion order is already their schedule order; a slot whose deadlines
differ (tick_ms > 1, and the list of overdue timers) is merge-sorted stably by deadline.

Complexity (n timers)
---------------------
- schedule, cancel, deadline_of, ``in``: O(1) expected (one probe sequence, one append).
- schedule_many / cancel_many: the same per item, in one C loop that prefetches the table.
- advance: O(fired + cascaded + slots visited); an empty stretch of any length is crossed in
  O(levels) by looking for the next occupied slot in each level's 256-bit bitmap, so a jump of
  hours costs what the timers in it cost, not what the milliseconds cost.
- next_deadline: O(1) while cached (scheduling keeps the cache; firing or cancelling the earliest
  timer drops it); otherwise one scan of the earliest occupied slot.
- Exact at any tick size: ``advance(t)`` fires every deadline <= t; ``tick_ms`` only sets how
  many deadlines share a slot.

Threading contract
------------------
Not thread-safe: one owner (the timer's event loop) calls it. Every method holds the GIL from
start to end and never calls back into Python while changing state, so a call is atomic for
other Python threads, but nothing is locked. The GIL is deliberately not released: taskwheel
scales with processes, and releasing it would make concurrent use silently corrupt the wheel.

Built with TASKWHEEL_DEBUG=1 the wheel runs ``check_invariants()`` after mutating calls (every
call while it holds up to 4096 timers, about one call in n / 1024 beyond), with bounds checks
and line tracing on.
"""
cimport cython
from cpython cimport array
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport INT64_MAX, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import array as _array
import time as _time

# wheel.pxd declares the C layout (Entry, Slot, slot ids, the bucket encoding), the fields and C
# methods of TimingWheel, and the inline helpers; this file implements them.

DEBUG_BUILD = bool(TW_DEBUG)

cdef array.array _KEYS_TEMPLATE = _array.array("q")

# Tables with fewer buckets than this grow in one call (about 1 ms at 65,536); see Storage.
cdef uint64_t _move_min = MOVE_MIN


def _set_move_min(buckets):
    """Sets the smallest table that grows a few buckets at a time (tests: 16, every table)."""
    global _move_min
    _move_min = buckets


cdef void _delete_in(uint64_t *table, uint64_t mask, uint64_t i) noexcept nogil:
    """Backward-shift deletion of bucket i: no tombstones, probe distances stay exact."""
    cdef uint64_t j = (i + 1) & mask, b
    while True:
        b = table[j]
        if b == 0 or _psl(b) == 0:
            break
        table[i] = b - TW_PSL_ONE
        i = j
        j = (j + 1) & mask
    table[i] = 0


cdef int _place(uint64_t *table, uint64_t mask, uint64_t *carry, uint64_t i) noexcept nogil:
    """Robin hood insertion of *carry, probing from i with the distance it already holds.

    Returns 0, or -1 when some bucket would need a probe distance above TW_PSL_MAX; then the
    bucket left without a place is in *carry and the caller rebuilds a larger table.
    """
    cdef uint64_t b, c = carry[0]
    while True:
        b = table[i]
        if b == 0:
            table[i] = c
            return 0
        if _psl(b) < _psl(c):
            table[i] = c
            c = b
        if _psl(c) == TW_PSL_MAX:
            carry[0] = c
            return -1
        c += TW_PSL_ONE
        i = (i + 1) & mask


cdef void _stable_sort(Entry *a, Py_ssize_t n, Entry *tmp) noexcept nogil:
    """Bottom-up merge sort by deadline that keeps the order of equal deadlines."""
    cdef Py_ssize_t run = 32, lo, mid, hi, i, j, k, width
    cdef Entry *src = a
    cdef Entry *dst = tmp
    cdef Entry *swap
    lo = 0
    while lo < n:
        _insertion_sort(a + lo, min(run, n - lo))
        lo += run
    width = run
    while width < n:
        lo = 0
        while lo < n:
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if src[j].deadline < src[i].deadline:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
            lo += 2 * width
        swap = src
        src = dst
        dst = swap
        width *= 2
    if src != a:
        memcpy(a, src, n * sizeof(Entry))


cdef object _int64_view(object values, str name):
    """A typed view of an int64 buffer; lists and tuples of ints are converted in C."""
    cdef const int64_t[:] view
    if isinstance(values, (list, tuple)):
        values = _array.array("q", values)
    try:
        view = values
    except (TypeError, ValueError, BufferError) as exc:
        raise TypeError(
            f"{name} must be a one-dimensional int64 buffer (array('q'), numpy int64) "
            f"or a list of ints, not {type(values).__name__}: {exc}") from None
    return view


@cython.final
cdef class TimingWheel:
    """Keys (int64) fire once the wheel advances to or past their deadline (int64 ms)."""

    def __cinit__(self, tick_ms=1, start_ms=None):
        cdef int64_t tick = _int64(tick_ms, "tick_ms"), start
        if tick <= 0:
            raise ValueError(f"tick_ms must be positive, got {tick}")
        if start_ms is None:
            start_ms = _time.time_ns() // 1_000_000
        start = _int64(start_ms, "start_ms")
        self.tick_ms = tick
        self._now_ms = start
        self._cur = self._utick(start)
        self._table = tw_table_alloc(MIN_TABLE)
        if self._table == NULL:
            raise MemoryError()
        self._mask = MIN_TABLE - 1
        self._next_valid = True

    def __dealloc__(self):
        cdef Py_ssize_t s
        for s in range(NSLOTS):
            PyMem_RawFree(self._slots[s].items)
        tw_table_free(self._table, self._mask + 1)
        tw_table_free(self._old, self._old_mask + 1)
        PyMem_RawFree(self._out)
        PyMem_RawFree(self._tmp)

    # -- placement ---------------------------------------------------------------------------

    cdef inline uint64_t _utick(self, int64_t ms) noexcept nogil:
        cdef int64_t t = ms
        if self.tick_ms != 1:
            t = ms / self.tick_ms
            if ms % self.tick_ms < 0:
                t -= 1
        return (<uint64_t>t) ^ TW_SIGN

    cdef inline uint32_t _slot_for(self, int64_t deadline) noexcept nogil:
        cdef uint64_t u, x
        cdef int level
        if deadline <= self._now_ms:
            return OVERDUE
        u = self._utick(deadline)
        x = u ^ self._cur
        if x < LEVEL_SLOTS:
            return <uint32_t>(u & 255)
        level = (63 - TW_CLZ64(x)) >> 3
        return <uint32_t>(level * LEVEL_SLOTS + ((u >> (level * LEVEL_BITS)) & 255))

    # -- the key -> (slot, position) table ---------------------------------------------------

    cdef inline Entry *_entry_of(self, uint64_t bucket) noexcept nogil:
        return &self._slots[(bucket & TW_SLOT_MASK) - 1].items[(bucket & TW_LOC_MASK) >> TW_POS_SHIFT]

    cdef inline Py_ssize_t _key_in(self, const uint64_t *table, uint64_t mask, int64_t key,
                                   uint64_t h) noexcept nogil:
        cdef uint64_t i = h & mask, tag = h >> TW_TAG_SHIFT, d = 0, b
        while True:
            b = table[i]
            if b == 0 or _psl(b) < d:
                return -1
            if (b >> TW_TAG_SHIFT) == tag and self._entry_of(b).key == key:
                return <Py_ssize_t>i
            i = (i + 1) & mask
            d += 1

    cdef inline Py_ssize_t _loc_in(self, const uint64_t *table, uint64_t mask, uint64_t h,
                                   uint64_t loc) noexcept nogil:
        # At most one bucket names a given (slot, position), and it belongs to the key stored
        # there, so matching the location alone tells whether that entry is live.
        cdef uint64_t i = h & mask, d = 0, b
        while True:
            b = table[i]
            if b == 0 or _psl(b) < d:
                return -1
            if (b & TW_LOC_MASK) == loc:
                return <Py_ssize_t>i
            i = (i + 1) & mask
            d += 1

    cdef inline Py_ssize_t _find_key(self, int64_t key, uint64_t h) noexcept nogil:
        """The key's bucket in the table, moved there first if the old table held it; -1.
        The table's probe is written out here, not a call of _key_in: it is the hot path, and
        as a call it cost 5-10 % of schedule+expire and cancel (perf/bench_core.py)."""
        cdef uint64_t mask = self._mask, i = h & mask, tag = h >> TW_TAG_SHIFT, d = 0, b
        while True:
            b = self._table[i]
            if b == 0 or _psl(b) < d:
                break
            if (b >> TW_TAG_SHIFT) == tag and self._entry_of(b).key == key:
                return <Py_ssize_t>i
            i = (i + 1) & mask
            d += 1
        return -1 if self._old == NULL else self._find_key_old(key, h)

    cdef inline Py_ssize_t _find_loc(self, uint64_t h, uint64_t loc) noexcept nogil:
        """The bucket naming ``loc`` in the table, moved there first if the old table held it;
        -1. At most one bucket names a given (slot, position), and it belongs to the key stored
        there, so matching the location alone tells whether that entry is live."""
        cdef uint64_t mask = self._mask, i = h & mask, d = 0, b
        while True:
            b = self._table[i]
            if b == 0 or _psl(b) < d:
                break
            if (b & TW_LOC_MASK) == loc:
                return <Py_ssize_t>i
            i = (i + 1) & mask
            d += 1
        return -1 if self._old == NULL else self._find_loc_old(h, loc)

    cdef Py_ssize_t _find_key_old(self, int64_t key, uint64_t h) noexcept nogil:
        cdef Py_ssize_t i = self._key_in(self._old, self._old_mask, key, h)
        return -1 if i < 0 else self._move_from_old(<uint64_t>i, h)

    cdef Py_ssize_t _find_loc_old(self, uint64_t h, uint64_t loc) noexcept nogil:
        cdef Py_ssize_t i = self._loc_in(self._old, self._old_mask, h, loc)
        return -1 if i < 0 else self._move_from_old(<uint64_t>i, h)

    cdef inline bint _take_loc(self, uint64_t h, uint64_t loc) noexcept nogil:
        """Deletes the bucket naming ``loc`` from whichever table holds it; False if none does
        (the entry is stale). Firing a key the old table still holds this way costs one more
        probe, not a move into the table and a deletion there."""
        cdef Py_ssize_t i = self._loc_in(self._table, self._mask, h, loc)
        if i >= 0:
            self._delete_at(<uint64_t>i)
            return True
        if self._old == NULL:
            return False
        i = self._loc_in(self._old, self._old_mask, h, loc)
        if i < 0:
            return False
        _delete_in(self._old, self._old_mask, <uint64_t>i)
        return True

    cdef uint64_t _peek_key(self, int64_t key) noexcept nogil:
        """The key's bucket in either table, or 0; moves nothing (for the read-only methods)."""
        cdef uint64_t h = tw_mix(key)
        cdef Py_ssize_t i = self._key_in(self._table, self._mask, key, h)
        if i >= 0:
            return self._table[i]
        if self._old != NULL:
            i = self._key_in(self._old, self._old_mask, key, h)
            if i >= 0:
                return self._old[i]
        return 0

    cdef Py_ssize_t _move_from_old(self, uint64_t j, uint64_t h) noexcept nogil:
        """Moves bucket j of the old table (its key hashes to h) into the table; its index there."""
        cdef uint64_t loc = self._old[j] & TW_LOC_MASK
        _delete_in(self._old, self._old_mask, j)
        if self._insert(h, loc) != 0:
            self._broken = True
            return -1
        return self._loc_in(self._table, self._mask, h, loc)

    cdef void _move_some(self, Py_ssize_t budget) noexcept nogil:
        """Moves about ``budget`` buckets of the old table into the table (an empty one passed
        counts as one), a whole run at a time; frees the old table once it is empty.

        A run is the buckets from _old_next up to the next empty bucket or one at its home
        position: a bucket after that has its home after it too, so no probe for a key left
        in the old table passes through the run, and the run can be emptied without the
        backward shifts of a deletion (which made moving a bucket cost about as much as a
        cluster is long). So every position below _old_next stays empty, and every bucket at
        or after it has its home there too (those wrapped past the table's end, at its start,
        go in the first run). A deletion in the old table keeps that: it shifts a bucket back
        only into the position it emptied, at or after _old_next."""
        cdef uint64_t cap, r, b, carry, h
        while budget > 0 and self._old != NULL:
            cap = self._old_mask + 1
            r = self._old_next
            if r == cap:
                tw_table_free(self._old, cap)
                self._old = NULL
                return
            if self._old[r] == 0:
                self._old_next = r + 1
                budget -= 1
                continue
            while True:
                b = self._old[r]
                h = tw_mix(self._entry_of(b).key)
                carry = b & ~(TW_PSL_MAX << TW_PSL_SHIFT)
                self._old[r] = 0
                if _place(self._table, self._mask, &carry, h & self._mask) != 0:
                    # A bucket without a place: rebuild whole, which takes the old table too.
                    self._old_next = r + 1
                    if self._rebuild(2 * (self._mask + 1), carry) != 0:
                        self._broken = True
                    return
                r += 1
                budget -= 1
                if r == cap or self._old[r] == 0 or _psl(self._old[r]) == 0:
                    break
                if r + 8 < cap and self._old[r + 8] != 0:
                    TW_PREFETCH(self._entry_of(self._old[r + 8]))
            self._old_next = r

    cdef int _insert(self, uint64_t h, uint64_t loc) noexcept nogil:
        cdef uint64_t carry = loc | ((h >> TW_TAG_SHIFT) << TW_TAG_SHIFT)
        if _place(self._table, self._mask, &carry, h & self._mask) == 0:
            return 0
        return self._rebuild(2 * (self._mask + 1), carry)

    cdef void _delete_at(self, uint64_t i) noexcept nogil:
        _delete_in(self._table, self._mask, i)

    cdef inline void _prefetch_bucket(self, int64_t key) noexcept nogil:
        TW_PREFETCH(&self._table[tw_mix(key) & self._mask])

    cdef inline void _prefetch_buckets(self, const Entry *items, uint32_t n) noexcept nogil:
        # Loops over a slot prefetch TW_PREFETCH_AHEAD entries ahead; this starts them off,
        # which matters for the small level-0 slots that most fires come from.
        cdef uint32_t p
        for p in range(min(n, <uint32_t>TW_PREFETCH_AHEAD)):
            self._prefetch_bucket(items[p].key)

    cdef inline void _prefetch_entry(self, int64_t key) noexcept nogil:
        # Second stage for lookups by key: the bucket was prefetched earlier, so walking the
        # probe sequence is cheap; fetch the entry of the first bucket whose tag matches.
        cdef uint64_t h = tw_mix(key), mask = self._mask, i = h & mask, tag = h >> TW_TAG_SHIFT, d = 0, b
        while True:
            b = self._table[i]
            if b == 0 or _psl(b) < d:
                return
            if (b >> TW_TAG_SHIFT) == tag:
                TW_PREFETCH(self._entry_of(b))
                return
            i = (i + 1) & mask
            d += 1

    cdef int _rebuild(self, uint64_t capacity, uint64_t extra) noexcept nogil:
        """Rehashes every bucket (and `extra`, a bucket without a place) into `capacity`, those
        of an old table still being moved too, at once."""
        cdef uint64_t *table
        cdef uint64_t mask, b, carry, h
        cdef uint64_t i, old_cap = self._mask + 1
        cdef bint ok
        while True:
            table = tw_table_alloc(capacity)
            if table == NULL:
                if extra != 0:
                    self._broken = True
                return -1
            tw_advise_huge(table, capacity * sizeof(uint64_t))
            mask = capacity - 1
            ok = True
            for i in range(old_cap + 1):
                b = extra if i == old_cap else self._table[i]
                if b == 0:
                    continue
                if capacity <= old_cap and i < old_cap:
                    # Shrinking keeps the low bits of the home index: no need to read the key.
                    h = (i - _psl(b)) & self._mask
                else:
                    h = tw_mix(self._entry_of(b).key)
                carry = b & ~(TW_PSL_MAX << TW_PSL_SHIFT)
                if _place(table, mask, &carry, h & mask) != 0:
                    ok = False
                    break
            if ok and self._old != NULL:
                for i in range(self._old_next, self._old_mask + 1):
                    b = self._old[i]
                    if b == 0:
                        continue
                    carry = b & ~(TW_PSL_MAX << TW_PSL_SHIFT)
                    if _place(table, mask, &carry, tw_mix(self._entry_of(b).key) & mask) != 0:
                        ok = False
                        break
            if ok:
                tw_table_free(self._table, self._mask + 1)
                tw_table_free(self._old, self._old_mask + 1)
                self._old = NULL
                self._table = table
                self._mask = mask
                return 0
            tw_table_free(table, capacity)
            capacity *= 2

    cdef int _reserve_table(self, Py_ssize_t count) noexcept nogil:
        """Grows the table so that `count` keys keep the load factor at or below 0.8."""
        cdef uint64_t cap = self._mask + 1
        if <uint64_t>count * 5 <= cap * 4:
            return 0
        while <uint64_t>count * 5 > cap * 4:
            cap *= 2
        if self._old != NULL or self._mask + 1 < _move_min:
            return self._rebuild(cap, 0)
        return self._start_growing(cap)

    cdef int _start_growing(self, uint64_t capacity) noexcept nogil:
        """Makes an empty table of ``capacity`` the table, the current one the old one."""
        cdef uint64_t *table = tw_table_alloc(capacity)
        if table == NULL:
            return -1
        # Neither huge pages (see tw_advise_huge: a fault in an advised region may wait for the
        # kernel to compact memory, 5-50 ms in the test VM) nor a memset: avoiding a long
        # call is what growing a few buckets at a time is for.
        self._old = self._table
        self._old_mask = self._mask
        self._old_next = 0
        self._table = table
        self._mask = capacity - 1
        return 0

    cdef void _shrink(self) noexcept nogil:
        cdef uint64_t cap = self._mask + 1
        if cap <= MIN_TABLE or <uint64_t>self._count * 16 >= cap or self._old != NULL:
            return
        while cap > MIN_TABLE and <uint64_t>self._count * 5 <= (cap // 2) * 2:
            cap //= 2
        self._rebuild(cap, 0)   # on failure the old table simply stays

    # -- slots -------------------------------------------------------------------------------

    cdef int _reserve_slot(self, uint32_t s, uint64_t count) noexcept nogil:
        cdef Slot *slot = &self._slots[s]
        cdef uint64_t cap = slot.cap
        cdef Entry *items
        if count <= cap:
            return 0
        if count > TW_POS_MAX:
            return -1
        cap = cap + cap // 2
        if cap < count:
            cap = count
        if cap < 8:
            cap = 8
        if cap > TW_POS_MAX:
            cap = TW_POS_MAX
        items = <Entry *>PyMem_RawRealloc(slot.items, cap * sizeof(Entry))
        if items == NULL:
            return -1
        slot.items = items
        slot.cap = <uint32_t>cap
        return 0

    cdef inline int _append(self, uint32_t s, int64_t key, int64_t deadline, uint32_t *pos) noexcept nogil:
        cdef Slot *slot = &self._slots[s]
        if slot.size == slot.cap and self._reserve_slot(s, <uint64_t>slot.size + 1) != 0:
            return -1
        slot.items[slot.size].key = key
        slot.items[slot.size].deadline = deadline
        pos[0] = slot.size
        slot.size += 1
        slot.live += 1
        if s != OVERDUE:
            self._occupied[s >> 6] |= (<uint64_t>1) << (s & 63)
        return 0

    cdef void _reset(self, uint32_t s) noexcept nogil:
        cdef Slot *slot = &self._slots[s]
        slot.size = 0
        slot.live = 0
        if s != OVERDUE:
            self._occupied[s >> 6] &= ~((<uint64_t>1) << (s & 63))
        if slot.cap > KEEP_CAPACITY:
            PyMem_RawFree(slot.items)
            slot.items = NULL
            slot.cap = 0

    cdef void _release(self, uint32_t s) noexcept nogil:
        """One live entry of slot s went stale."""
        cdef Slot *slot = &self._slots[s]
        slot.live -= 1
        if slot.live == 0:
            self._reset(s)
        elif slot.size >= COMPACT_MIN and slot.live * 2 < slot.size:
            if self._batching:
                self._dirty[s >> 6] |= (<uint64_t>1) << (s & 63)
            else:
                self._compact(s)

    cdef void _end_batch(self) noexcept nogil:
        # Batches compact once at the end: a slot the batch emptied costs nothing.
        cdef uint32_t w, s
        cdef Slot *slot
        self._batching = False
        for w in range(BITMAP_WORDS):
            while self._dirty[w]:
                s = (w << 6) + TW_CTZ64(self._dirty[w])
                self._dirty[w] &= self._dirty[w] - 1
                slot = &self._slots[s]
                if slot.size >= COMPACT_MIN and slot.live * 2 < slot.size:
                    self._compact(s)

    cdef void _compact(self, uint32_t s) noexcept nogil:
        cdef Slot *slot = &self._slots[s]
        cdef uint32_t p, w = 0, n = slot.size
        cdef Py_ssize_t i
        cdef Entry e
        self._prefetch_buckets(slot.items, n)
        for p in range(n):
            if p + TW_PREFETCH_AHEAD < n:
                self._prefetch_bucket(slot.items[p + TW_PREFETCH_AHEAD].key)
            e = slot.items[p]
            i = self._find_loc(tw_mix(e.key), _loc(s, p))
            if i < 0:
                continue
            if w != p:
                slot.items[w] = e
                self._table[i] = (self._table[i] & ~TW_LOC_MASK) | _loc(s, w)
            w += 1
        slot.size = w

    # -- schedule and cancel -----------------------------------------------------------------

    cdef int _schedule(self, int64_t key, int64_t deadline) noexcept nogil:
        cdef uint64_t h = tw_mix(key), b, loc
        cdef Py_ssize_t i = self._find_key(key, h)
        cdef uint32_t s = self._slot_for(deadline), old, pos
        cdef int64_t old_deadline
        if i < 0 and self._reserve_table(self._count + 1) != 0:
            return -1
        if self._append(s, key, deadline, &pos) != 0:
            return -1
        loc = _loc(s, pos)
        if i >= 0:
            b = self._table[i]
            old = <uint32_t>((b & TW_SLOT_MASK) - 1)
            old_deadline = self._entry_of(b).deadline
            self._table[i] = (b & ~TW_LOC_MASK) | loc
            self._release(old)
            if old_deadline == self._next_ms:
                self._next_valid = False
        else:
            if self._insert(h, loc) != 0:
                self._broken = True
                return -1
            self._count += 1
            if self._old != NULL:
                self._move_some(MOVE_PER_CALL)
            if self._count == 1:
                self._next_ms = deadline
                self._next_valid = True
                return 0
        if deadline < self._next_ms:
            self._next_ms = deadline
        return 0

    cdef int _cancel(self, int64_t key) noexcept nogil:
        cdef uint64_t h = tw_mix(key), b
        cdef Py_ssize_t i = self._find_key(key, h)
        cdef int64_t deadline
        if i < 0:
            return 0
        b = self._table[i]
        deadline = self._entry_of(b).deadline
        self._delete_at(<uint64_t>i)
        self._count -= 1
        self._release(<uint32_t>((b & TW_SLOT_MASK) - 1))
        if deadline == self._next_ms:
            self._next_valid = False
        if self._old != NULL:
            self._move_some(MOVE_PER_CALL)
        return 1

    # -- advance -----------------------------------------------------------------------------

    cdef int _reserve_out(self, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t cap = self._out_cap
        cdef Entry *out
        if n <= cap:
            return 0
        cap = max(n, cap + cap // 2, 64)
        out = <Entry *>PyMem_RawRealloc(self._out, cap * sizeof(Entry))
        if out == NULL:
            return -1
        self._out = out
        self._out_cap = cap
        return 0

    cdef int _fire_all(self, uint32_t s) noexcept nogil:
        """Moves every live timer of slot s to the fired buffer and empties the slot."""
        cdef Slot *slot = &self._slots[s]
        cdef Entry *items = slot.items
        cdef uint32_t p, n = slot.size
        cdef Py_ssize_t start = self._out_len
        if self._reserve_out(self._out_len + slot.live) != 0:
            return -1
        self._prefetch_buckets(items, n)
        for p in range(n):
            if p + TW_PREFETCH_AHEAD < n:
                self._prefetch_bucket(items[p + TW_PREFETCH_AHEAD].key)
            if self._take_loc(tw_mix(items[p].key), _loc(s, p)):
                self._out[self._out_len] = items[p]
                self._out_len += 1
        self._count -= self._out_len - start
        self._reset(s)
        return 0

    cdef int _fire_until(self, uint32_t s, int64_t limit) noexcept nogil:
        """Fires the live timers of slot s due at or before `limit`; keeps the rest in order."""
        cdef Slot *slot = &self._slots[s]
        cdef Entry e
        cdef uint32_t p, w = 0
        cdef Py_ssize_t i, start = self._out_len
        if self._reserve_out(self._out_len + slot.live) != 0:
            return -1
        self._prefetch_buckets(slot.items, slot.size)
        for p in range(slot.size):
            if p + TW_PREFETCH_AHEAD < slot.size:
                self._prefetch_bucket(slot.items[p + TW_PREFETCH_AHEAD].key)
            e = slot.items[p]
            if e.deadline <= limit:
                # As in _fire_all: deleted from whichever table holds it, never moved first.
                if self._take_loc(tw_mix(e.key), _loc(s, p)):
                    self._out[self._out_len] = e
                    self._out_len += 1
                continue
            i = self._find_loc(tw_mix(e.key), _loc(s, p))
            if i < 0:
                continue
            if w != p:
                slot.items[w] = e
                self._table[i] = (self._table[i] & ~TW_LOC_MASK) | _loc(s, w)
            w += 1
        self._count -= self._out_len - start
        if w == 0:
            self._reset(s)
        else:
            slot.size = w
            slot.live = w
        return 0

    cdef int _cascade(self, uint32_t s) noexcept nogil:
        """Re-places the live timers of a higher-level slot relative to the new wheel time."""
        cdef Slot *slot = &self._slots[s]
        cdef Entry *items = slot.items
        cdef uint32_t p, n = slot.size, pos, t
        cdef Py_ssize_t i
        self._prefetch_buckets(items, n)
        for p in range(n):
            if p + TW_PREFETCH_AHEAD < n:
                self._prefetch_bucket(items[p + TW_PREFETCH_AHEAD].key)
            i = self._find_loc(tw_mix(items[p].key), _loc(s, p))
            if i < 0:
                continue
            t = self._slot_for(items[p].deadline)
            if self._append(t, items[p].key, items[p].deadline, &pos) != 0:
                self._broken = True
                return -1
            self._table[i] = (self._table[i] & ~TW_LOC_MASK) | _loc(t, pos)
        self._reset(s)
        return 0

    cdef int _next_event(self, uint64_t *event) noexcept nogil:
        """The level of the next occupied slot after the current tick, and the tick it starts.

        Level 0 is searched first, then level 1 and so on: a level-k slot starts after every
        slot of the levels below it, because those all lie in the current level-k block.
        Returns -1 when no level slot is occupied (the current tick's slot aside).
        """
        cdef int k, j, shift
        cdef uint64_t cur = self._cur
        for k in range(LEVELS):
            shift = k * LEVEL_BITS
            j = _next_bit(&self._occupied[k * 4], <int>((cur >> shift) & 255) + 1)
            if j >= 0:
                if k == LEVELS - 1:
                    event[0] = (<uint64_t>j) << shift
                else:
                    event[0] = ((cur >> (shift + LEVEL_BITS)) << (shift + LEVEL_BITS)) | ((<uint64_t>j) << shift)
                return k
        return -1

    cdef inline uint32_t _slot_of_event(self, int k, uint64_t event) noexcept nogil:
        return <uint32_t>(k * LEVEL_SLOTS + ((event >> (k * LEVEL_BITS)) & 255))

    cdef int _sort_out(self, Py_ssize_t start) noexcept nogil:
        cdef Py_ssize_t i, n = self._out_len - start
        cdef Entry *a = self._out + start
        cdef Entry *tmp
        for i in range(1, n):
            if a[i].deadline < a[i - 1].deadline:
                break
        else:
            return 0
        if n > self._tmp_cap:
            tmp = <Entry *>PyMem_RawRealloc(self._tmp, n * sizeof(Entry))
            if tmp == NULL:
                return -1
            self._tmp = tmp
            self._tmp_cap = n
        _stable_sort(a, n, self._tmp)
        return 0

    cdef int _advance(self, int64_t now_ms) noexcept nogil:
        cdef uint64_t target, event
        cdef uint32_t s
        cdef Py_ssize_t start
        cdef int k
        self._out_len = 0
        if self._old != NULL:
            self._move_some(MOVE_PER_ADVANCE)
        if now_ms < self._now_ms:
            # Only overdue timers can be due before the wheel time; the wheel time stays.
            if self._slots[OVERDUE].live:
                if self._fire_until(OVERDUE, now_ms) != 0 or self._sort_out(0) != 0:
                    return -1
            if self._out_len:
                self._next_valid = False
            return 0
        if self._slots[OVERDUE].live:
            if self._fire_all(OVERDUE) != 0 or self._sort_out(0) != 0:
                return -1
        target = self._utick(now_ms)
        while True:
            s = <uint32_t>(self._cur & 255)
            start = self._out_len
            if self._cur == target:
                if self._slots[s].live:
                    if self.tick_ms == 1:
                        if self._fire_all(s) != 0:
                            return -1
                    elif self._fire_until(s, now_ms) != 0 or self._sort_out(start) != 0:
                        return -1
                break
            if self._slots[s].live:
                if self._fire_all(s) != 0 or (self.tick_ms != 1 and self._sort_out(start) != 0):
                    return -1
            k = self._next_event(&event)
            if k < 0 or event > target:
                # Nothing is placed before the target: every slot keeps its meaning there.
                self._cur = target
                continue
            self._cur = event
            if k > 0 and self._cascade(self._slot_of_event(k, event)) != 0:
                return -1
        self._now_ms = now_ms
        if self._out_len:
            self._next_valid = False
        return 0

    cdef int64_t _min_live(self, uint32_t s) noexcept nogil:
        # Only entries below the best so far need the liveness probe: a few per slot.
        cdef Slot *slot = &self._slots[s]
        cdef uint32_t p
        cdef int64_t best = INT64_MAX
        cdef bint found = False
        for p in range(slot.size):
            if (not found or slot.items[p].deadline < best) and \
                    self._find_loc(tw_mix(slot.items[p].key), _loc(s, p)) >= 0:
                best = slot.items[p].deadline
                found = True
        return best

    # -- Python surface ----------------------------------------------------------------------

    cdef void _check_usable(self) except *:
        if self._broken:
            raise RuntimeError("this TimingWheel lost state in a failed allocation; discard it")

    cdef void _debug_check(self) except *:
        # Every call checks a small wheel; a large one is checked on about 1 call in n / 1024,
        # so that a debug run of the test suite costs O(1000) per call, not O(n).
        self._debug_calls += 1
        if self._count <= 4096 or self._debug_calls % (self._count >> 10) == 0:
            self.check_invariants()

    @property
    def now_ms(self):
        """The wheel time: the latest time advanced to (or start_ms)."""
        return self._now_ms

    def schedule(self, key, deadline_ms):
        """Schedules `key` at `deadline_ms`; a pending key moves. Past deadlines fire next advance."""
        cdef int64_t k = _int64(key, "key"), d = _int64(deadline_ms, "deadline_ms")
        self._check_usable()
        if self._schedule(k, d) != 0:
            self._check_usable()
            raise MemoryError()
        if TW_DEBUG:
            self._debug_check()

    def schedule_many(self, keys, deadlines):
        """schedule() for each pair of two int64 buffers of equal length, in order."""
        cdef const int64_t[:] kv = _int64_view(keys, "keys")
        cdef const int64_t[:] dv = _int64_view(deadlines, "deadlines")
        cdef Py_ssize_t i, n = kv.shape[0]
        cdef uint32_t s
        cdef uint32_t *counts
        cdef int rc = 0
        self._check_usable()
        if dv.shape[0] != n:
            raise ValueError(f"keys and deadlines differ in length: {n} != {dv.shape[0]}")
        if n == 0:
            return
        if n > 64:
            # Size every slot array and the table once, so that the loop below never reallocates.
            counts = <uint32_t *>PyMem_RawMalloc(NSLOTS * sizeof(uint32_t))
            if counts == NULL:
                raise MemoryError()
            memset(counts, 0, NSLOTS * sizeof(uint32_t))
            for i in range(n):
                counts[self._slot_for(dv[i])] += 1
            for s in range(NSLOTS):
                if counts[s] and self._reserve_slot(s, <uint64_t>self._slots[s].size + counts[s]) != 0:
                    rc = -1
                    break
            PyMem_RawFree(counts)
            if rc != 0 or self._reserve_table(self._count + n) != 0:
                raise MemoryError()
        self._batching = True
        for i in range(min(n, TW_PREFETCH_AHEAD)):
            self._prefetch_bucket(kv[i])
        for i in range(n):
            if i + TW_PREFETCH_AHEAD < n:
                self._prefetch_bucket(kv[i + TW_PREFETCH_AHEAD])
            if self._schedule(kv[i], dv[i]) != 0:
                rc = -1
                break
        self._end_batch()
        if rc != 0:
            self._check_usable()
            raise MemoryError()
        if TW_DEBUG:
            self._debug_check()

    def cancel(self, key):
        """Cancels `key`; True when it was pending."""
        cdef int64_t k = _int64(key, "key")
        self._check_usable()
        cdef bint done = self._cancel(k)
        if TW_DEBUG:
            self._debug_check()
        return done

    def cancel_many(self, keys):
        """cancel() for each key of an int64 buffer; returns how many were pending."""
        cdef const int64_t[:] kv = _int64_view(keys, "keys")
        cdef Py_ssize_t i, n = kv.shape[0], done = 0
        self._check_usable()
        # Two-stage prefetch: the bucket 2 * AHEAD keys ahead, the entry it names AHEAD ahead.
        self._batching = True
        for i in range(min(n, 2 * TW_PREFETCH_AHEAD)):
            self._prefetch_bucket(kv[i])
        for i in range(min(n, TW_PREFETCH_AHEAD)):
            self._prefetch_entry(kv[i])
        for i in range(n):
            if i + 2 * TW_PREFETCH_AHEAD < n:
                self._prefetch_bucket(kv[i + 2 * TW_PREFETCH_AHEAD])
            if i + TW_PREFETCH_AHEAD < n:
                self._prefetch_entry(kv[i + TW_PREFETCH_AHEAD])
            done += self._cancel(kv[i])
        self._end_batch()
        self._shrink()
        if TW_DEBUG:
            self._debug_check()
        return done

    def advance(self, now_ms):
        """Fires every pending key with deadline <= now_ms, as array('q') ordered by (deadline,
        schedule order), and moves the wheel time to now_ms.

        A now_ms before the wheel time fires the overdue keys due by then and leaves the wheel
        time where it is, so a clock stepping back never fires anything early.
        """
        cdef int64_t now = _int64(now_ms, "now_ms")
        cdef array.array fired
        cdef Py_ssize_t i, n
        cdef int64_t *dst
        self._check_usable()
        if self._advance(now) != 0:
            self._check_usable()
            raise MemoryError()
        n = self._out_len
        fired = array.clone(_KEYS_TEMPLATE, n, False)
        dst = <int64_t *>fired.data.as_voidptr
        for i in range(n):
            dst[i] = self._out[i].key
        self._out_len = 0
        if self._out_cap > KEEP_OUT:
            PyMem_RawFree(self._out)
            self._out = NULL
            self._out_cap = 0
            PyMem_RawFree(self._tmp)
            self._tmp = NULL
            self._tmp_cap = 0
        if n:
            self._shrink()
        if TW_DEBUG:
            self._debug_check()
        return fired

    def next_deadline(self):
        """The earliest pending deadline (<= now_ms when some key is overdue), or None."""
        cdef uint64_t event
        cdef int k
        cdef uint32_t s
        if self._count == 0:
            return None
        if not self._next_valid:
            if self._slots[OVERDUE].live:
                s = OVERDUE
            elif self._slots[self._cur & 255].live:
                s = <uint32_t>(self._cur & 255)
            else:
                k = self._next_event(&event)
                s = self._slot_of_event(k, event)
            self._next_ms = self._min_live(s)
            self._next_valid = True
        return self._next_ms

    def deadline_of(self, key):
        """The deadline `key` is pending at, or None."""
        cdef int64_t k = _int64(key, "key")
        cdef uint64_t b = self._peek_key(k)
        if b == 0:
            return None
        return self._entry_of(b).deadline

    def __contains__(self, key):
        cdef int64_t k
        if not PyIndex_Check(key):
            return False
        key = key.__index__()
        if not (-(1 << 63) <= key < (1 << 63)):
            return False
        k = key
        return self._peek_key(k) != 0

    def __len__(self):
        return self._count

    def __repr__(self):
        return f"TimingWheel(tick_ms={self.tick_ms}, now_ms={self._now_ms}, pending={self._count})"

    def memory_bytes(self):
        """Bytes this wheel holds: the object, the table, every slot array and the buffers."""
        cdef Py_ssize_t total = type(self).__basicsize__
        cdef Py_ssize_t s
        total += (self._mask + 1) * sizeof(uint64_t)
        if self._old != NULL:
            total += (self._old_mask + 1) * sizeof(uint64_t)
        for s in range(NSLOTS):
            total += self._slots[s].cap * sizeof(Entry)
        total += (self._out_cap + self._tmp_cap) * sizeof(Entry)
        return total

    def check_invariants(self):
        """Raises AssertionError when the wheel's structures disagree. O(n + table size)."""
        cdef uint64_t i, j, b, h, cap = self._mask + 1, mask
        cdef uint64_t *table
        cdef uint32_t s, p
        cdef Py_ssize_t buckets = 0
        cdef int t
        cdef Entry *e
        cdef uint32_t *live = <uint32_t *>PyMem_RawMalloc(NSLOTS * sizeof(uint32_t))
        cdef int64_t earliest = INT64_MAX
        if live == NULL:
            raise MemoryError()
        memset(live, 0, NSLOTS * sizeof(uint32_t))
        try:
            assert self._cur == self._utick(self._now_ms), "wheel tick does not match wheel time"
            for t in range(2):
                # The table, then the old one while growing: each key in exactly one of them.
                table, mask = (self._table, self._mask) if t == 0 else (self._old, self._old_mask)
                if table == NULL:
                    continue
                for i in range(mask + 1):
                    b = table[i]
                    if b == 0:
                        continue
                    assert t == 0 or i >= self._old_next, f"old bucket {i} is below the move's position"
                    # ... and its home at or after it, else a probe for it would cross emptied runs.
                    assert t == 0 or self._old_next == 0 or _psl(b) <= i - self._old_next, \
                        f"old bucket {i}'s home lies before the move's position"
                    buckets += 1
                    s = <uint32_t>((b & TW_SLOT_MASK) - 1)
                    p = <uint32_t>((b & TW_LOC_MASK) >> TW_POS_SHIFT)
                    assert s < NSLOTS, f"bucket {i} names slot {s}"
                    assert p < self._slots[s].size, f"bucket {i} names position {p} past slot {s}'s end"
                    e = &self._slots[s].items[p]
                    h = tw_mix(e.key)
                    assert (h >> TW_TAG_SHIFT) == (b >> TW_TAG_SHIFT), f"bucket {i} has a wrong tag"
                    assert ((i - (h & mask)) & mask) == _psl(b), f"bucket {i} has a wrong probe distance"
                    j = (i + 1) & mask
                    assert table[j] == 0 or _psl(table[j]) <= _psl(b) + 1, f"robin hood order broken at {j}"
                    assert self._key_in(table, mask, e.key, h) == <Py_ssize_t>i, \
                        f"key {e.key} is not found at its bucket"
                    if t == 1:
                        assert self._key_in(self._table, self._mask, e.key, h) < 0, \
                            f"key {e.key} is in both tables"
                    live[s] += 1
                    if s == OVERDUE:
                        assert e.deadline <= self._now_ms, f"overdue key {e.key} is due after the wheel time"
                    else:
                        assert e.deadline > self._now_ms, f"key {e.key} in slot {s} is already due"
                        assert self._slot_for(e.deadline) == s, \
                            f"key {e.key} sits in slot {s}, not {self._slot_for(e.deadline)}"
                    if e.deadline < earliest:
                        earliest = e.deadline
            assert buckets == self._count, f"{buckets} buckets for {self._count} timers"
            assert self._old == NULL or self._old_mask < self._mask, "the old table is not the smaller"
            for s in range(NSLOTS):
                assert self._slots[s].live == live[s], f"slot {s} counts {self._slots[s].live} live, has {live[s]}"
                assert self._slots[s].size <= self._slots[s].cap, f"slot {s} overflows its array"
                # Stale entries are bounded: fewer than COMPACT_MIN, or no more than the live ones.
                assert self._slots[s].size - self._slots[s].live < COMPACT_MIN \
                    or self._slots[s].live * 2 >= self._slots[s].size, f"slot {s} is more than half stale"
                assert live[s] > 0 or self._slots[s].size == 0, f"slot {s} holds only stale entries"
                if s != OVERDUE:
                    assert bool(self._occupied[s >> 6] & ((<uint64_t>1) << (s & 63))) == (live[s] > 0), \
                        f"occupancy bit of slot {s} is wrong"
            assert <uint64_t>self._count * 5 <= cap * 4, "table load above 0.8"
            if self._next_valid and self._count:
                assert self._next_ms == earliest, f"cached next deadline {self._next_ms} != {earliest}"
        finally:
            PyMem_RawFree(live)
