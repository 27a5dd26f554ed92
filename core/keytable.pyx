# cython: language_level=3, cdivision=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""The timing wheel's key table: each pending key -> the (slot, position) of its entry.

Buckets
-------
Open addressing over a power-of-two array of 8-byte buckets, 0 meaning empty::

    bits  0-11   slot + 1         the wheel slot holding the key's entry (2049 slots)
    bits 12-43   position         the entry's index in that slot's array
    bits 44-51   probe distance   how far the bucket sits past its home, hash & mask (<= 255)
    bits 52-63   tag              the top 12 bits of the key's hash

A bucket holds no key: the key is stored once, in the entry the bucket names, which keeps a
bucket at 8 bytes. A probe compares tags and reads an entry only when the tag matches (one
wrong key in 4096 does), so a lookup by key costs one random access to the table and one to
the entry it finds. The hash is SplitMix64's finalizer, a bijection, so distinct keys never
share a full hash. At most one bucket names a given (slot, position), and it belongs to the
key stored there: a walk over a slot learns whether an entry is live by matching the location
alone (kt_find_loc), without reading a key.

Robin hood, backward shift
--------------------------
An insert takes the place of any bucket closer to its home than the insert has probed, and
carries that bucket on (robin hood): probe distances stay short, and a lookup stops at the
first bucket closer to home than it has gone. A delete shifts the rest of its run back one
bucket (backward shift): no tombstones, every distance stays exact. A bucket that would need
a distance above 255 makes the table double in one call; at 80 % load at most, that is rare.

Growth
------
The table doubles before it passes 80 % load, and after a cancel_many or an advance that
leaves it below 1/16 full it shrinks (rebuilt whole) to between 20 and 40 %. Doubling in one
call rehashes every key, reading it from its entry (a cache miss apiece): at a million keys
that call is tens of milliseconds, a stall of the timer's event loop. So a table of MOVE_MIN
(65,536) buckets or more doubles a few buckets at a time: a new, empty table takes every
insert, and the old one is emptied from its first bucket on, a run of buckets at a time
(MOVE_PER_CALL buckets a schedule or cancel, MOVE_PER_ADVANCE an advance). A key found in the
old table meanwhile is moved on the spot, so every index kt_find_* returns is the new table's;
lookups ask both tables until the old one is empty. The longest call becomes a few
milliseconds, for about 40 % more time per key while the growth lasts (two tables to probe, a
bucket moved at a time). A growth asked for while one is under way rebuilds whole, old table
included, as every shrink does. ``_set_move_min(16)`` makes every growth incremental, which the
model tests use.

Memory
------
From 1 MB on Linux a table comes from mmap, whose pages are zero until touched: a new table
costs no memset in the call that makes it, and its page faults come one at a time as buckets
land on them. A table rebuilt whole asks for 2 MB pages (madvise), so that lookups in a large
table do not also miss the TLB; a growing one does not, since a fault in such a region may
wait for the kernel to compact memory, the kind of stall growing incrementally avoids. At
40-80 % load, where a table stands between doublings, a key costs 10-20 bytes of table.

Complexity (n keys)
-------------------
- find by key or by location, insert, delete: O(1) expected, probe distances at most 255.
- growth: O(1) per call while it lasts (about MOVE_PER_CALL buckets, plus the rest of a run);
  a rebuild, a shrink, and the doubling of a table below MOVE_MIN: O(n + capacity).

Threading contract
------------------
None of its own: a KeyTable is a plain struct inside one TimingWheel, used only from that
wheel's methods, under the wheel's contract (one owner, holding the GIL).
"""
# keytable.pxd declares the struct, the bucket layout and the inline operations; this file
# implements the rare ones, which other modules call through a pointer.

# Tables with fewer buckets than this double in one call (about 1 ms at 65,536); see Growth.
cdef uint64_t _move_min = MOVE_MIN


def _set_move_min(buckets):
    """Sets the smallest table that grows a few buckets at a time (tests: 16, every table)."""
    global _move_min
    _move_min = buckets


cdef int kt_init(KeyTable *t) noexcept nogil:
    """An empty table of MIN_TABLE buckets in a zeroed struct; -1 when memory ran out."""
    t.buckets = tw_table_alloc(MIN_TABLE)
    if t.buckets == NULL:
        return -1
    t.mask = MIN_TABLE - 1
    return 0


cdef void kt_free(KeyTable *t) noexcept nogil:
    tw_table_free(t.buckets, t.mask + 1)
    tw_table_free(t.old, t.old_mask + 1)
    t.buckets = NULL
    t.old = NULL


cdef int kt_rebuild(KeyTable *t, const Slot *slots, uint64_t capacity, uint64_t extra) noexcept nogil:
    """Rehashes every bucket (and `extra`, a bucket without a place) into `capacity`, those
    of an old table still being moved too, at once; -1 when memory ran out."""
    cdef uint64_t *table
    cdef uint64_t mask, b, carry, h
    cdef uint64_t i, old_cap = t.mask + 1
    cdef bint ok
    while True:
        table = tw_table_alloc(capacity)
        if table == NULL:
            return -1
        tw_advise_huge(table, capacity * sizeof(uint64_t))
        mask = capacity - 1
        ok = True
        for i in range(old_cap + 1):
            b = extra if i == old_cap else t.buckets[i]
            if b == 0:
                continue
            if capacity <= old_cap and i < old_cap:
                # Shrinking keeps the low bits of the home index: no need to read the key.
                h = (i - tw_psl(b)) & t.mask
            else:
                h = tw_mix(kt_entry_of(slots, b).key)
            carry = b & ~(TW_PSL_MAX << TW_PSL_SHIFT)
            if kt_place(table, mask, &carry, h & mask) != 0:
                ok = False
                break
        if ok and t.old != NULL:
            for i in range(t.old_next, t.old_mask + 1):
                b = t.old[i]
                if b == 0:
                    continue
                carry = b & ~(TW_PSL_MAX << TW_PSL_SHIFT)
                if kt_place(table, mask, &carry, tw_mix(kt_entry_of(slots, b).key) & mask) != 0:
                    ok = False
                    break
        if ok:
            tw_table_free(t.buckets, t.mask + 1)
            tw_table_free(t.old, t.old_mask + 1)
            t.old = NULL
            t.buckets = table
            t.mask = mask
            return 0
        tw_table_free(table, capacity)
        capacity *= 2


cdef int _start_growing(KeyTable *t, uint64_t capacity) noexcept nogil:
    """Makes an empty table of ``capacity`` the table, the current one the old one."""
    cdef uint64_t *table = tw_table_alloc(capacity)
    if table == NULL:
        return -1
    # Neither huge pages nor a memset (see Memory): a long call is what this avoids.
    t.old = t.buckets
    t.old_mask = t.mask
    t.old_next = 0
    t.buckets = table
    t.mask = capacity - 1
    return 0


cdef int kt_grow(KeyTable *t, const Slot *slots, Py_ssize_t count) noexcept nogil:
    """kt_reserve's slow path: doubles the table until `count` keys fit at 80 % load."""
    cdef uint64_t cap = t.mask + 1
    while <uint64_t>count * 5 > cap * 4:
        cap *= 2
    if t.old != NULL or t.mask + 1 < _move_min:
        return kt_rebuild(t, slots, cap, 0)
    return _start_growing(t, cap)


cdef void kt_shrink(KeyTable *t, const Slot *slots) noexcept nogil:
    """Rebuilds a table below 1/16 load smaller; on failure the table simply stays."""
    cdef uint64_t cap = t.mask + 1
    if cap <= MIN_TABLE or <uint64_t>t.count * 16 >= cap or t.old != NULL:
        return
    while cap > MIN_TABLE and <uint64_t>t.count * 5 <= (cap // 2) * 2:
        cap //= 2
    kt_rebuild(t, slots, cap, 0)


cdef void kt_move_some(KeyTable *t, const Slot *slots, Py_ssize_t budget) noexcept nogil:
    """Moves about ``budget`` buckets of the old table into the table (an empty one passed
    counts as one), a whole run at a time; frees the old table once it is empty.

    A run is the buckets from old_next up to the next empty bucket or one at its home
    position: a bucket after that has its home after it too, so no probe for a key left in
    the old table passes through the run, and the run can be emptied without the backward
    shifts of a deletion (which made moving a bucket cost about as much as a cluster is
    long). So every position below old_next stays empty, and every bucket at or after it has
    its home there too (those wrapped past the table's end, at its start, go in the first
    run). A deletion in the old table keeps that: it shifts a bucket back only into the
    position it emptied, at or after old_next."""
    cdef uint64_t cap, r, b, carry, h
    while budget > 0 and t.old != NULL:
        cap = t.old_mask + 1
        r = t.old_next
        if r == cap:
            tw_table_free(t.old, cap)
            t.old = NULL
            return
        if t.old[r] == 0:
            t.old_next = r + 1
            budget -= 1
            continue
        while True:
            b = t.old[r]
            h = tw_mix(kt_entry_of(slots, b).key)
            carry = b & ~(TW_PSL_MAX << TW_PSL_SHIFT)
            t.old[r] = 0
            if kt_place(t.buckets, t.mask, &carry, h & t.mask) != 0:
                # A bucket without a place: rebuild whole, which takes the old table too.
                t.old_next = r + 1
                if kt_rebuild(t, slots, 2 * (t.mask + 1), carry) != 0:
                    t.lost = True
                return
            r += 1
            budget -= 1
            if r == cap or t.old[r] == 0 or tw_psl(t.old[r]) == 0:
                break
            if r + 8 < cap and t.old[r + 8] != 0:
                TW_PREFETCH(kt_entry_of(slots, t.old[r + 8]))
        t.old_next = r


cdef Py_ssize_t _move_from_old(KeyTable *t, const Slot *slots, uint64_t j, uint64_t h) noexcept nogil:
    """Moves bucket j of the old table (its key hashes to h) into the table; its index there."""
    cdef uint64_t loc = t.old[j] & TW_LOC_MASK
    kt_delete_in(t.old, t.old_mask, j)
    if kt_put(t, slots, h, loc) != 0:
        return -1
    return kt_loc_in(t.buckets, t.mask, h, loc)


cdef Py_ssize_t kt_find_key_old(KeyTable *t, const Slot *slots, int64_t key, uint64_t h) noexcept nogil:
    """kt_find_key in the old table: the key's bucket, moved into the table first; -1."""
    cdef Py_ssize_t i = kt_key_in(t.old, t.old_mask, slots, key, h)
    return -1 if i < 0 else _move_from_old(t, slots, <uint64_t>i, h)


cdef Py_ssize_t kt_find_loc_old(KeyTable *t, const Slot *slots, uint64_t h, uint64_t loc) noexcept nogil:
    """kt_find_loc in the old table: the bucket naming loc, moved into the table first; -1."""
    cdef Py_ssize_t i = kt_loc_in(t.old, t.old_mask, h, loc)
    return -1 if i < 0 else _move_from_old(t, slots, <uint64_t>i, h)


cdef int kt_check(const KeyTable *t, const Slot *slots, uint32_t nslots) except -1:
    """Raises AssertionError when the table disagrees with itself or with the entries its
    buckets name. O(n + capacity)."""
    cdef uint64_t i, j, b, h, mask
    cdef const uint64_t *table
    cdef uint32_t s, p
    cdef Py_ssize_t buckets = 0
    cdef int k
    cdef const Entry *e
    for k in range(2):
        # The table, then the old one while growing: each key in exactly one of them.
        if k == 0:
            table, mask = t.buckets, t.mask
        elif t.old != NULL:
            table, mask = t.old, t.old_mask
        else:
            break
        for i in range(mask + 1):
            b = table[i]
            if b == 0:
                continue
            assert k == 0 or i >= t.old_next, f"old bucket {i} is below the move's position"
            # ... and its home at or after it, else a probe for it would cross emptied runs.
            assert k == 0 or t.old_next == 0 or tw_psl(b) <= i - t.old_next, \
                f"old bucket {i}'s home lies before the move's position"
            buckets += 1
            s = tw_slot_of(b)
            p = tw_pos_of(b)
            assert s < nslots, f"bucket {i} names slot {s}"
            assert p < slots[s].size, f"bucket {i} names position {p} past slot {s}'s end"
            e = &slots[s].items[p]
            h = tw_mix(e.key)
            assert (h >> TW_TAG_SHIFT) == (b >> TW_TAG_SHIFT), f"bucket {i} has a wrong tag"
            assert ((i - (h & mask)) & mask) == tw_psl(b), f"bucket {i} has a wrong probe distance"
            j = (i + 1) & mask
            assert table[j] == 0 or tw_psl(table[j]) <= tw_psl(b) + 1, f"robin hood order broken at {j}"
            assert kt_key_in(table, mask, slots, e.key, h) == <Py_ssize_t>i, \
                f"key {e.key} is not found at its bucket"
            if k == 1:
                assert kt_key_in(t.buckets, t.mask, slots, e.key, h) < 0, f"key {e.key} is in both tables"
    assert buckets == t.count, f"{buckets} buckets for {t.count} keys"
    assert t.old == NULL or t.old_mask < t.mask, "the old table is not the smaller"
    assert <uint64_t>t.count * 5 <= (t.mask + 1) * 4, "table load above 0.8"
    return 0
