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
no pointers and there is no Python object per timer. A key table (keytable.pyx: open
addressing, robin hood, 8-byte buckets) maps each pending key to the (slot, position) of its
entry, which makes a key findable. Cancelling a key only deletes its bucket: the entry left
behind is stale, and every walk over a slot asks the table whether (slot, position) is still
live. A slot holding 64 or more stale entries, and more stale than live ones, is compacted (a
batch compacts once, at its end), so stale entries never cost more than live ones. The table
doubles before it passes 80 % load; a large one does so a few buckets per call, so that no
call stalls the event loop with a rehash of every key.
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

from taskwheel.core.keytable cimport (
    MOVE_PER_ADVANCE, MOVE_PER_CALL, TW_POS_MAX, kt_check, kt_delete_at, kt_entry_of, kt_find_key,
    kt_find_loc, kt_free, kt_init, kt_insert, kt_memory_bytes, kt_move_some, kt_nth, kt_peek_key,
    kt_prefetch_bucket, kt_prefetch_entry, kt_reserve, kt_set_loc, kt_shrink, kt_span, kt_take_loc,
    tw_loc, tw_mix, tw_slot_of)

import array as _array
import time as _time

from taskwheel.core.keytable import _set_move_min  # tests and benchmarks import it from here

# wheel.pxd declares the C layout (slot ids, the fields and C methods of TimingWheel) and the
# inline helpers; this file implements them. Entry, Slot and the key table are keytable.pxd's.

DEBUG_BUILD = bool(TW_DEBUG)

cdef array.array _KEYS_TEMPLATE = _array.array("q")

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
        if kt_init(&self._table) != 0:
            raise MemoryError()
        self._next_valid = True

    def __dealloc__(self):
        cdef Py_ssize_t s
        for s in range(NSLOTS):
            PyMem_RawFree(self._slots[s].items)
        kt_free(&self._table)
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

    # -- slots -------------------------------------------------------------------------------

    cdef inline void _prefetch_buckets(self, const Entry *items, uint32_t n) noexcept nogil:
        # Loops over a slot prefetch TW_PREFETCH_AHEAD entries ahead; this starts them off,
        # which matters for the small level-0 slots that most fires come from.
        cdef uint32_t p
        for p in range(min(n, <uint32_t>TW_PREFETCH_AHEAD)):
            kt_prefetch_bucket(&self._table, items[p].key)

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
                kt_prefetch_bucket(&self._table, slot.items[p + TW_PREFETCH_AHEAD].key)
            e = slot.items[p]
            i = kt_find_loc(&self._table, self._slots, tw_mix(e.key), tw_loc(s, p))
            if i < 0:
                continue
            if w != p:
                slot.items[w] = e
                kt_set_loc(&self._table, <uint64_t>i, tw_loc(s, w))
            w += 1
        slot.size = w

    # -- schedule and cancel -----------------------------------------------------------------

    cdef int _schedule(self, int64_t key, int64_t deadline) noexcept nogil:
        cdef uint64_t h = tw_mix(key), b, loc
        cdef Py_ssize_t i = kt_find_key(&self._table, self._slots, key, h)
        cdef uint32_t s = self._slot_for(deadline), old, pos
        cdef int64_t old_deadline
        if i < 0 and kt_reserve(&self._table, self._slots, self._table.count + 1) != 0:
            return -1
        if self._append(s, key, deadline, &pos) != 0:
            return -1
        loc = tw_loc(s, pos)
        if i >= 0:
            b = self._table.buckets[i]
            old = tw_slot_of(b)
            old_deadline = kt_entry_of(self._slots, b).deadline
            kt_set_loc(&self._table, <uint64_t>i, loc)
            self._release(old)
            if old_deadline == self._next_ms:
                self._next_valid = False
        else:
            if kt_insert(&self._table, self._slots, h, loc) != 0:
                return -1   # the table lost a key: _table.lost
            if self._table.old != NULL:
                kt_move_some(&self._table, self._slots, MOVE_PER_CALL)
            if self._table.count == 1:
                self._next_ms = deadline
                self._next_valid = True
                return 0
        if deadline < self._next_ms:
            self._next_ms = deadline
        return 0

    cdef int _cancel(self, int64_t key) noexcept nogil:
        cdef uint64_t h = tw_mix(key), b
        cdef Py_ssize_t i = kt_find_key(&self._table, self._slots, key, h)
        cdef int64_t deadline
        if i < 0:
            return 0
        b = self._table.buckets[i]
        deadline = kt_entry_of(self._slots, b).deadline
        kt_delete_at(&self._table, <uint64_t>i)
        self._release(tw_slot_of(b))
        if deadline == self._next_ms:
            self._next_valid = False
        if self._table.old != NULL:
            kt_move_some(&self._table, self._slots, MOVE_PER_CALL)
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
        if self._reserve_out(self._out_len + slot.live) != 0:
            return -1
        self._prefetch_buckets(items, n)
        for p in range(n):
            if p + TW_PREFETCH_AHEAD < n:
                kt_prefetch_bucket(&self._table, items[p + TW_PREFETCH_AHEAD].key)
            if kt_take_loc(&self._table, tw_mix(items[p].key), tw_loc(s, p)):
                self._out[self._out_len] = items[p]
                self._out_len += 1
        self._reset(s)
        return 0

    cdef int _fire_until(self, uint32_t s, int64_t limit) noexcept nogil:
        """Fires the live timers of slot s due at or before `limit`; keeps the rest in order."""
        cdef Slot *slot = &self._slots[s]
        cdef Entry e
        cdef uint32_t p, w = 0
        cdef Py_ssize_t i
        if self._reserve_out(self._out_len + slot.live) != 0:
            return -1
        self._prefetch_buckets(slot.items, slot.size)
        for p in range(slot.size):
            if p + TW_PREFETCH_AHEAD < slot.size:
                kt_prefetch_bucket(&self._table, slot.items[p + TW_PREFETCH_AHEAD].key)
            e = slot.items[p]
            if e.deadline <= limit:
                # As in _fire_all: deleted from whichever table holds it, never moved first.
                if kt_take_loc(&self._table, tw_mix(e.key), tw_loc(s, p)):
                    self._out[self._out_len] = e
                    self._out_len += 1
                continue
            i = kt_find_loc(&self._table, self._slots, tw_mix(e.key), tw_loc(s, p))
            if i < 0:
                continue
            if w != p:
                slot.items[w] = e
                kt_set_loc(&self._table, <uint64_t>i, tw_loc(s, w))
            w += 1
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
                kt_prefetch_bucket(&self._table, items[p + TW_PREFETCH_AHEAD].key)
            i = kt_find_loc(&self._table, self._slots, tw_mix(items[p].key), tw_loc(s, p))
            if i < 0:
                continue
            t = self._slot_for(items[p].deadline)
            if self._append(t, items[p].key, items[p].deadline, &pos) != 0:
                self._broken = True
                return -1
            kt_set_loc(&self._table, <uint64_t>i, tw_loc(t, pos))
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
        if self._table.old != NULL:
            kt_move_some(&self._table, self._slots, MOVE_PER_ADVANCE)
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
                    kt_find_loc(&self._table, self._slots, tw_mix(slot.items[p].key), tw_loc(s, p)) >= 0:
                best = slot.items[p].deadline
                found = True
        return best

    # -- Python surface ----------------------------------------------------------------------

    cdef void _check_usable(self) except *:
        if self._broken or self._table.lost:
            raise RuntimeError("this TimingWheel lost state in a failed allocation; discard it")

    cdef void _debug_check(self) except *:
        # Every call checks a small wheel; a large one is checked on about 1 call in n / 1024,
        # so that a debug run of the test suite costs O(1000) per call, not O(n).
        self._debug_calls += 1
        if self._table.count <= 4096 or self._debug_calls % (self._table.count >> 10) == 0:
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
            if rc != 0 or kt_reserve(&self._table, self._slots, self._table.count + n) != 0:
                raise MemoryError()
        self._batching = True
        for i in range(min(n, TW_PREFETCH_AHEAD)):
            kt_prefetch_bucket(&self._table, kv[i])
        for i in range(n):
            if i + TW_PREFETCH_AHEAD < n:
                kt_prefetch_bucket(&self._table, kv[i + TW_PREFETCH_AHEAD])
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
            kt_prefetch_bucket(&self._table, kv[i])
        for i in range(min(n, TW_PREFETCH_AHEAD)):
            kt_prefetch_entry(&self._table, self._slots, kv[i])
        for i in range(n):
            if i + 2 * TW_PREFETCH_AHEAD < n:
                kt_prefetch_bucket(&self._table, kv[i + 2 * TW_PREFETCH_AHEAD])
            if i + TW_PREFETCH_AHEAD < n:
                kt_prefetch_entry(&self._table, self._slots, kv[i + TW_PREFETCH_AHEAD])
            done += self._cancel(kv[i])
        self._end_batch()
        kt_shrink(&self._table, self._slots)
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
            kt_shrink(&self._table, self._slots)
        if TW_DEBUG:
            self._debug_check()
        return fired

    def next_deadline(self):
        """The earliest pending deadline (<= now_ms when some key is overdue), or None."""
        cdef uint64_t event
        cdef int k
        cdef uint32_t s
        if self._table.count == 0:
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
        cdef uint64_t b = kt_peek_key(&self._table, self._slots, k)
        if b == 0:
            return None
        return kt_entry_of(self._slots, b).deadline

    def __contains__(self, key):
        cdef int64_t k
        if not PyIndex_Check(key):
            return False
        key = key.__index__()
        if not (-(1 << 63) <= key < (1 << 63)):
            return False
        k = key
        return kt_peek_key(&self._table, self._slots, k) != 0

    def __len__(self):
        return self._table.count

    def __repr__(self):
        return f"TimingWheel(tick_ms={self.tick_ms}, now_ms={self._now_ms}, pending={self._table.count})"

    def memory_bytes(self):
        """Bytes this wheel holds: the object, the table, every slot array and the buffers."""
        cdef Py_ssize_t total = type(self).__basicsize__
        cdef Py_ssize_t s
        total += kt_memory_bytes(&self._table)
        for s in range(NSLOTS):
            total += self._slots[s].cap * sizeof(Entry)
        total += (self._out_cap + self._tmp_cap) * sizeof(Entry)
        return total

    def check_invariants(self):
        """Raises AssertionError when the wheel's structures disagree. O(n + table size)."""
        cdef uint64_t i, b
        cdef uint32_t s
        cdef Entry *e
        cdef uint32_t *live = <uint32_t *>PyMem_RawMalloc(NSLOTS * sizeof(uint32_t))
        cdef int64_t earliest = INT64_MAX
        if live == NULL:
            raise MemoryError()
        memset(live, 0, NSLOTS * sizeof(uint32_t))
        try:
            assert self._cur == self._utick(self._now_ms), "wheel tick does not match wheel time"
            # The table on its own, and that each bucket names an entry inside its slot's array;
            # then what the wheel asks of the entries the buckets name, which are the live ones.
            kt_check(&self._table, self._slots, NSLOTS)
            for i in range(kt_span(&self._table)):
                b = kt_nth(&self._table, i)
                if b == 0:
                    continue
                s = tw_slot_of(b)
                e = kt_entry_of(self._slots, b)
                live[s] += 1
                if s == OVERDUE:
                    assert e.deadline <= self._now_ms, f"overdue key {e.key} is due after the wheel time"
                else:
                    assert e.deadline > self._now_ms, f"key {e.key} in slot {s} is already due"
                    assert self._slot_for(e.deadline) == s, \
                        f"key {e.key} sits in slot {s}, not {self._slot_for(e.deadline)}"
                if e.deadline < earliest:
                    earliest = e.deadline
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
            if self._next_valid and self._table.count:
                assert self._next_ms == earliest, f"cached next deadline {self._next_ms} != {earliest}"
        finally:
            PyMem_RawFree(live)
