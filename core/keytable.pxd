# cython: language_level=3
"""C-level declarations of keytable.pyx: the bucket layout, the KeyTable struct, the hot
operations (lookups, insert, delete, prefetch) as inline functions, and the rare ones
(growing, shrinking, moving a run) that keytable.pyx implements. The table and its
contracts are described in keytable.pyx."""
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__GNUC__) || defined(__clang__)
      #define TW_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #else
      #define TW_PREFETCH(p) ((void)0)
    #endif
    /* bucket = (slot + 1) | position << 12 | probe distance << 44 | hash tag << 52; 0 = empty */
    #define TW_SLOT_MASK 0xFFFULL
    #define TW_POS_SHIFT 12
    #define TW_LOC_MASK 0xFFFFFFFFFFFULL
    #define TW_PSL_SHIFT 44
    #define TW_PSL_ONE (1ULL << 44)
    #define TW_PSL_MAX 255ULL
    #define TW_TAG_SHIFT 52
    #define TW_POS_MAX 0xFFFFFFFFULL
    /* A bucket's fields, in C like tw_mix: as Cython functions a TASKWHEEL_DEBUG build traces
       them, and every traced nogil call takes the GIL state, a few times per bucket in each
       invariant check. */
    static inline uint64_t tw_loc(uint32_t s, uint64_t pos) { return (uint64_t)(s + 1) | (pos << TW_POS_SHIFT); }
    static inline uint32_t tw_slot_of(uint64_t b) { return (uint32_t)((b & TW_SLOT_MASK) - 1); }
    static inline uint32_t tw_pos_of(uint64_t b) { return (uint32_t)((b & TW_LOC_MASK) >> TW_POS_SHIFT); }
    static inline uint64_t tw_psl(uint64_t b) { return (b >> TW_PSL_SHIFT) & TW_PSL_MAX; }
    #if defined(__linux__)
      #include <sys/mman.h>
    #endif
    /* Lookups land at random: on Linux, ask for 2 MB pages so that lookups in a large table
       do not also miss the TLB. Only whole pages inside the block are advised. */
    static inline void tw_advise_huge(void *p, size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE) && !defined(TW_NO_HUGEPAGES)
        uintptr_t start = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
        uintptr_t end = ((uintptr_t)p + n) & ~(uintptr_t)4095;
        if (n >= ((size_t)4 << 20) && end > start)
            madvise((void *)start, end - start, MADV_HUGEPAGE);
    #endif
    }
    /* From TW_LAZY_MIN bytes on Linux the table comes straight from mmap, whose pages are zero
       until first touched: a new table costs no memset in the call that makes it. tracemalloc
       is told of it, so that it counts what it counts from PyMem_RawCalloc. */
    #define TW_LAZY_MIN ((size_t)1 << 20)
    static inline uint64_t *tw_table_alloc(size_t buckets) {
        size_t n = buckets * sizeof(uint64_t);
    #if defined(__linux__)
        if (n >= TW_LAZY_MIN) {
            void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED)
                return NULL;
            PyTraceMalloc_Track(0, (uintptr_t)p, n);
            return (uint64_t *)p;
        }
    #endif
        return (uint64_t *)PyMem_RawCalloc(buckets, sizeof(uint64_t));
    }
    static inline void tw_table_free(uint64_t *t, size_t buckets) {
        size_t n = buckets * sizeof(uint64_t);
        if (t == NULL)
            return;
    #if defined(__linux__)
        if (n >= TW_LAZY_MIN) {
            PyTraceMalloc_Untrack(0, (uintptr_t)t);
            munmap(t, n);
            return;
        }
    #endif
        PyMem_RawFree(t);
    }
    /* SplitMix64's finalizer: a bijection, so distinct keys never share a full hash. */
    static inline uint64_t tw_mix(int64_t key) {
        uint64_t z = (uint64_t)key;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    """
    void TW_PREFETCH(const void *p) noexcept nogil
    const uint64_t TW_SLOT_MASK
    const int TW_POS_SHIFT
    const uint64_t TW_LOC_MASK
    const int TW_PSL_SHIFT
    const uint64_t TW_PSL_ONE
    const uint64_t TW_PSL_MAX
    const int TW_TAG_SHIFT
    const uint64_t TW_POS_MAX
    uint64_t tw_loc(uint32_t s, uint64_t pos) noexcept nogil  # the location part: slot s, position pos
    uint32_t tw_slot_of(uint64_t bucket) noexcept nogil
    uint32_t tw_pos_of(uint64_t bucket) noexcept nogil
    uint64_t tw_psl(uint64_t bucket) noexcept nogil
    uint64_t tw_mix(int64_t key) noexcept nogil
    void tw_advise_huge(void *p, size_t n) noexcept nogil
    uint64_t *tw_table_alloc(size_t buckets) noexcept nogil
    void tw_table_free(uint64_t *t, size_t buckets) noexcept nogil


# -- what buckets point into: the wheel's slots (wheel.pyx describes them) --------------------

cdef struct Entry:
    # A timer as it sits in a slot: 16 bytes, no pointers. The table reads keys here.
    int64_t key
    int64_t deadline


cdef struct Slot:
    # A growable array of entries in insertion order. `size - live` entries are stale
    # (cancelled or moved); the key table decides which are live.
    Entry *items
    uint32_t size
    uint32_t cap
    uint32_t live


# -- the table -----------------------------------------------------------------------------

cdef struct KeyTable:
    uint64_t *buckets       # robin hood, open addressing; mask + 1 of them, a power of two
    uint64_t mask
    uint64_t *old           # while growing: the table being emptied into buckets; else NULL
    uint64_t old_mask
    uint64_t old_next       # while growing: old is empty below this position
    Py_ssize_t count        # keys held, in either table
    bint lost               # a failed allocation lost a key: the owner must not be used again


cdef enum:
    MIN_TABLE = 16
    MOVE_MIN = 65536          # tables from this many buckets grow a few buckets a call
    MOVE_PER_CALL = 16        # old buckets moved (or empty ones passed) per schedule or cancel
    MOVE_PER_ADVANCE = 4096   # ... per advance


# Rare operations, in keytable.pyx: called through a pointer from other modules.
cdef int kt_init(KeyTable *t) noexcept nogil
cdef void kt_free(KeyTable *t) noexcept nogil
cdef int kt_rebuild(KeyTable *t, const Slot *slots, uint64_t capacity, uint64_t extra) noexcept nogil
cdef int kt_grow(KeyTable *t, const Slot *slots, Py_ssize_t count) noexcept nogil
cdef void kt_shrink(KeyTable *t, const Slot *slots) noexcept nogil
cdef void kt_move_some(KeyTable *t, const Slot *slots, Py_ssize_t budget) noexcept nogil
# ... and where a lookup goes on into the old table, only while a growth lasts: out of line,
# since inlined into every caller of a lookup it made the hot loops measurably slower.
cdef Py_ssize_t kt_find_key_old(KeyTable *t, const Slot *slots, int64_t key, uint64_t h) noexcept nogil
cdef Py_ssize_t kt_find_loc_old(KeyTable *t, const Slot *slots, uint64_t h, uint64_t loc) noexcept nogil
cdef int kt_check(const KeyTable *t, const Slot *slots, uint32_t nslots) except -1


# -- buckets -------------------------------------------------------------------------------

cdef inline Entry *kt_entry_of(const Slot *slots, uint64_t bucket) noexcept nogil:
    return &slots[(bucket & TW_SLOT_MASK) - 1].items[(bucket & TW_LOC_MASK) >> TW_POS_SHIFT]


# -- one table -----------------------------------------------------------------------------

cdef inline Py_ssize_t kt_key_in(const uint64_t *table, uint64_t mask, const Slot *slots,
                                 int64_t key, uint64_t h) noexcept nogil:
    """The bucket holding `key` (whose hash is h) in one table, or -1."""
    cdef uint64_t i = h & mask, tag = h >> TW_TAG_SHIFT, d = 0, b
    while True:
        b = table[i]
        if b == 0 or tw_psl(b) < d:
            return -1
        if (b >> TW_TAG_SHIFT) == tag and kt_entry_of(slots, b).key == key:
            return <Py_ssize_t>i
        i = (i + 1) & mask
        d += 1


cdef inline Py_ssize_t kt_loc_in(const uint64_t *table, uint64_t mask, uint64_t h,
                                 uint64_t loc) noexcept nogil:
    """The bucket naming `loc` (its key's hash is h) in one table, or -1."""
    cdef uint64_t i = h & mask, d = 0, b
    while True:
        b = table[i]
        if b == 0 or tw_psl(b) < d:
            return -1
        if (b & TW_LOC_MASK) == loc:
            return <Py_ssize_t>i
        i = (i + 1) & mask
        d += 1


cdef inline int kt_place(uint64_t *table, uint64_t mask, uint64_t *carry, uint64_t i) noexcept nogil:
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
        if tw_psl(b) < tw_psl(c):
            table[i] = c
            c = b
        if tw_psl(c) == TW_PSL_MAX:
            carry[0] = c
            return -1
        c += TW_PSL_ONE
        i = (i + 1) & mask


cdef inline void kt_delete_in(uint64_t *table, uint64_t mask, uint64_t i) noexcept nogil:
    """Backward-shift deletion of bucket i: no tombstones, probe distances stay exact."""
    cdef uint64_t j = (i + 1) & mask, b
    while True:
        b = table[j]
        if b == 0 or tw_psl(b) == 0:
            break
        table[i] = b - TW_PSL_ONE
        i = j
        j = (j + 1) & mask
    table[i] = 0


# -- the table, old one included -----------------------------------------------------------

cdef inline int kt_put(KeyTable *t, const Slot *slots, uint64_t h, uint64_t loc) noexcept nogil:
    """Places a bucket naming `loc` (its key's hash is h) in the table, count unchanged (a
    key moved from the old table is no new key). -1 when a larger table was needed and
    could not be had: a key is lost then."""
    cdef uint64_t carry = loc | ((h >> TW_TAG_SHIFT) << TW_TAG_SHIFT)
    if kt_place(t.buckets, t.mask, &carry, h & t.mask) == 0:
        return 0
    if kt_rebuild(t, slots, 2 * (t.mask + 1), carry) == 0:
        return 0
    t.lost = True
    return -1


cdef inline Py_ssize_t kt_find_key(KeyTable *t, const Slot *slots, int64_t key,
                                   uint64_t h) noexcept nogil:
    """The key's bucket in the table, moved there first if the old table held it; -1.
    The probe is written out, not a call of kt_key_in: on this hottest path the call
    measurably slowed schedule and cancel."""
    cdef uint64_t mask = t.mask, i = h & mask, tag = h >> TW_TAG_SHIFT, d = 0, b
    while True:
        b = t.buckets[i]
        if b == 0 or tw_psl(b) < d:
            break
        if (b >> TW_TAG_SHIFT) == tag and kt_entry_of(slots, b).key == key:
            return <Py_ssize_t>i
        i = (i + 1) & mask
        d += 1
    return -1 if t.old == NULL else kt_find_key_old(t, slots, key, h)


cdef inline Py_ssize_t kt_find_loc(KeyTable *t, const Slot *slots, uint64_t h,
                                   uint64_t loc) noexcept nogil:
    """The bucket naming `loc` in the table, moved there first if the old table held it; -1
    when the entry at loc is stale. Written out like kt_find_key."""
    cdef uint64_t mask = t.mask, i = h & mask, d = 0, b
    while True:
        b = t.buckets[i]
        if b == 0 or tw_psl(b) < d:
            break
        if (b & TW_LOC_MASK) == loc:
            return <Py_ssize_t>i
        i = (i + 1) & mask
        d += 1
    return -1 if t.old == NULL else kt_find_loc_old(t, slots, h, loc)


cdef inline uint64_t kt_peek_key(const KeyTable *t, const Slot *slots, int64_t key) noexcept nogil:
    """The key's bucket in either table, or 0; moves nothing (for read-only calls)."""
    cdef uint64_t h = tw_mix(key)
    cdef Py_ssize_t i = kt_key_in(t.buckets, t.mask, slots, key, h)
    if i >= 0:
        return t.buckets[i]
    if t.old != NULL:
        i = kt_key_in(t.old, t.old_mask, slots, key, h)
        if i >= 0:
            return t.old[i]
    return 0


cdef inline int kt_insert(KeyTable *t, const Slot *slots, uint64_t h, uint64_t loc) noexcept nogil:
    """Adds a key the table does not hold (kt_find_key said -1), its entry at `loc`."""
    if kt_put(t, slots, h, loc) != 0:
        return -1
    t.count += 1
    return 0


cdef inline void kt_set_loc(KeyTable *t, uint64_t i, uint64_t loc) noexcept nogil:
    """Points bucket i (an index kt_find_* returned) at the key's new entry."""
    t.buckets[i] = (t.buckets[i] & ~TW_LOC_MASK) | loc


cdef inline void kt_delete_at(KeyTable *t, uint64_t i) noexcept nogil:
    """Deletes bucket i (an index kt_find_* returned)."""
    kt_delete_in(t.buckets, t.mask, i)
    t.count -= 1


cdef inline bint kt_take_loc(KeyTable *t, uint64_t h, uint64_t loc) noexcept nogil:
    """Deletes the bucket naming `loc` from whichever table holds it; False if none does
    (the entry is stale). Firing a key the old table still holds this way costs one more
    probe, not a move into the table and a deletion there."""
    cdef Py_ssize_t i = kt_loc_in(t.buckets, t.mask, h, loc)
    if i >= 0:
        kt_delete_in(t.buckets, t.mask, <uint64_t>i)
    elif t.old == NULL:
        return False
    else:
        i = kt_loc_in(t.old, t.old_mask, h, loc)
        if i < 0:
            return False
        kt_delete_in(t.old, t.old_mask, <uint64_t>i)
    t.count -= 1
    return True


cdef inline int kt_reserve(KeyTable *t, const Slot *slots, Py_ssize_t count) noexcept nogil:
    """Grows the table so that `count` keys keep the load at or below 0.8; -1 when memory
    ran out (nothing is lost then)."""
    if <uint64_t>count * 5 <= (t.mask + 1) * 4:
        return 0
    return kt_grow(t, slots, count)


cdef inline void kt_prefetch_bucket(const KeyTable *t, int64_t key) noexcept nogil:
    TW_PREFETCH(&t.buckets[tw_mix(key) & t.mask])


cdef inline void kt_prefetch_entry(const KeyTable *t, const Slot *slots, int64_t key) noexcept nogil:
    # Second stage for lookups by key: the bucket was prefetched earlier, so walking the
    # probe sequence is cheap; fetch the entry of the first bucket whose tag matches.
    cdef uint64_t h = tw_mix(key), mask = t.mask, i = h & mask, tag = h >> TW_TAG_SHIFT, d = 0, b
    while True:
        b = t.buckets[i]
        if b == 0 or tw_psl(b) < d:
            return
        if (b >> TW_TAG_SHIFT) == tag:
            TW_PREFETCH(kt_entry_of(slots, b))
            return
        i = (i + 1) & mask
        d += 1


cdef inline uint64_t kt_span(const KeyTable *t) noexcept nogil:
    """How many buckets kt_nth walks: the table's, then the old table's while growing."""
    return t.mask + 1 + (t.old_mask + 1 if t.old != NULL else 0)


cdef inline uint64_t kt_nth(const KeyTable *t, uint64_t i) noexcept nogil:
    """Bucket i of the table and the old one taken as one array (i < kt_span), 0 when empty:
    for walks over every key, such as the owner's checks."""
    return t.buckets[i] if i <= t.mask else t.old[i - t.mask - 1]


cdef inline Py_ssize_t kt_memory_bytes(const KeyTable *t) noexcept nogil:
    cdef Py_ssize_t n = (t.mask + 1) * sizeof(uint64_t)
    if t.old != NULL:
        n += (t.old_mask + 1) * sizeof(uint64_t)
    return n
