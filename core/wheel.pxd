# cython: language_level=3
"""C-level declarations of wheel.pyx: the layout of a TimingWheel, its C methods, and the inline
helpers they share. The algorithm and its contracts are described in wheel.pyx."""
cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__GNUC__) || defined(__clang__)
      #define TW_PREFETCH(p) __builtin_prefetch((const void *)(p))
      #define TW_CLZ64(x) __builtin_clzll(x)
      #define TW_CTZ64(x) __builtin_ctzll(x)
    #else
      static inline int tw_clz64(uint64_t x) { int n = 0; while (!(x >> 63)) { x <<= 1; n++; } return n; }
      static inline int tw_ctz64(uint64_t x) { int n = 0; while (!(x & 1)) { x >>= 1; n++; } return n; }
      #define TW_PREFETCH(p) ((void)0)
      #define TW_CLZ64(x) tw_clz64(x)
      #define TW_CTZ64(x) tw_ctz64(x)
    #endif
    #ifdef TASKWHEEL_DEBUG
      #define TW_DEBUG 1
    #else
      #define TW_DEBUG 0
    #endif
    /* bucket = (slot + 1) | position << 12 | probe distance << 44 | hash tag << 52; 0 = empty */
    #define TW_SLOT_MASK 0xFFFULL
    #define TW_POS_SHIFT 12
    #define TW_LOC_MASK 0xFFFFFFFFFFFULL
    #define TW_PSL_SHIFT 44
    #define TW_PSL_ONE (1ULL << 44)
    #define TW_PSL_MAX 255ULL
    #define TW_TAG_SHIFT 52
    #define TW_SIGN (1ULL << 63)
    #ifndef TW_PREFETCH_AHEAD
    #define TW_PREFETCH_AHEAD 32  /* entries ahead: more than one memory latency of loop work */
    #endif
    #define TW_POS_MAX 0xFFFFFFFFULL
    #if defined(__linux__)
      #include <sys/mman.h>
    #endif
    /* The table is read at random: on Linux, ask for 2 MB pages so that lookups in a large
       table do not also miss the TLB. Only whole pages inside the block are advised. */
    static inline void tw_advise_huge(void *p, size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE) && !defined(TW_NO_HUGEPAGES)
        uintptr_t start = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
        uintptr_t end = ((uintptr_t)p + n) & ~(uintptr_t)4095;
        if (n >= ((size_t)4 << 20) && end > start)
            madvise((void *)start, end - start, MADV_HUGEPAGE);
    #endif
    }
    /* The key table's memory. From TW_LAZY_MIN bytes on Linux it comes straight from mmap,
       whose pages are zero until first touched: a new table then costs no memset in the
       call that makes it (4 MB took 2.5-4 ms, faults included, in the 2-core test VM), and
       the faults come a page at a time as buckets land on them. tracemalloc is told of it,
       so that it counts what it counted from PyMem_RawMalloc before. */
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
    int TW_CLZ64(uint64_t x) noexcept nogil
    int TW_CTZ64(uint64_t x) noexcept nogil
    const bint TW_DEBUG
    const uint64_t TW_SLOT_MASK
    const int TW_POS_SHIFT
    const uint64_t TW_LOC_MASK
    const int TW_PSL_SHIFT
    const uint64_t TW_PSL_ONE
    const uint64_t TW_PSL_MAX
    const int TW_TAG_SHIFT
    const uint64_t TW_SIGN
    const Py_ssize_t TW_PREFETCH_AHEAD
    const uint64_t TW_POS_MAX
    uint64_t tw_mix(int64_t key) noexcept nogil
    void tw_advise_huge(void *p, size_t n) noexcept nogil
    uint64_t *tw_table_alloc(size_t buckets) noexcept nogil
    void tw_table_free(uint64_t *t, size_t buckets) noexcept nogil


# -- C-level layout ------------------------------------------------------------------------

cdef enum:
    LEVELS = 8              # 8 levels x 8 bits of tick cover the whole int64 range
    LEVEL_BITS = 8
    LEVEL_SLOTS = 256
    OVERDUE = 2048          # slot id of the list of timers already due (deadline <= wheel time)
    NSLOTS = 2049           # LEVELS * LEVEL_SLOTS level slots, then OVERDUE
    BITMAP_WORDS = 33       # one bit per slot id: which level slots hold live timers


cdef struct Entry:
    # A timer as it sits in a slot: 16 bytes, no pointers.
    int64_t key
    int64_t deadline


cdef struct Slot:
    # A growable array of entries in insertion order. `size - live` entries are stale
    # (cancelled or moved); the hash table decides which are live.
    Entry *items
    uint32_t size
    uint32_t cap
    uint32_t live

cdef enum:
    MIN_TABLE = 16
    COMPACT_MIN = 64          # slots smaller than this are never compacted
    KEEP_CAPACITY = 512       # an emptied slot keeps its array up to this many entries
    KEEP_OUT = 65536          # the fired-timer buffer is freed after advances larger than this
    MOVE_MIN = 65536          # tables from this many buckets grow a few buckets a call
    MOVE_PER_CALL = 16        # old buckets moved (or empty ones passed) per schedule or cancel
    MOVE_PER_ADVANCE = 4096   # ... per advance


cdef inline uint64_t _loc(uint32_t s, uint64_t pos) noexcept nogil:
    return <uint64_t>(s + 1) | (pos << TW_POS_SHIFT)


cdef inline uint64_t _psl(uint64_t bucket) noexcept nogil:
    return (bucket >> TW_PSL_SHIFT) & TW_PSL_MAX


cdef inline int _next_bit(const uint64_t *words, int start) noexcept nogil:
    """First set bit at or after `start` in a 256-bit map, or -1."""
    cdef int w = start >> 6
    cdef uint64_t bits
    if w >= 4:
        return -1
    bits = words[w] & (~(<uint64_t>0) << (start & 63))
    while True:
        if bits:
            return (w << 6) + TW_CTZ64(bits)
        w += 1
        if w == 4:
            return -1
        bits = words[w]


cdef inline void _insertion_sort(Entry *a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef Entry e
    for i in range(1, n):
        e = a[i]
        j = i
        while j > 0 and a[j - 1].deadline > e.deadline:
            a[j] = a[j - 1]
            j -= 1
        a[j] = e


from taskwheel.core.int64 cimport PyIndex_Check, _int64


@cython.final
cdef class TimingWheel:
    cdef readonly int64_t tick_ms
    cdef int64_t _now_ms            # wheel time: every pending deadline above it is in a level slot
    cdef uint64_t _cur              # tick of _now_ms, mapped to uint64 so that order is kept
    cdef Slot _slots[NSLOTS]
    cdef uint64_t _occupied[BITMAP_WORDS]
    cdef uint64_t _dirty[BITMAP_WORDS]  # slots a batch left more than half stale
    cdef uint64_t *_table           # key -> (slot, position): robin hood, open addressing
    cdef uint64_t _mask             # table capacity - 1 (a power of two)
    cdef uint64_t *_old             # while growing: the table being emptied into _table; else NULL
    cdef uint64_t _old_mask
    cdef uint64_t _old_next         # while growing: the old table is empty below this position
    cdef Py_ssize_t _count          # live timers
    cdef Entry *_out                # fired timers of the current advance
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap
    cdef Entry *_tmp                # merge-sort scratch
    cdef Py_ssize_t _tmp_cap
    cdef bint _next_valid           # _next_ms holds the earliest deadline (when _count > 0)
    cdef int64_t _next_ms
    cdef bint _broken               # an allocation failed half-way through an update
    cdef bint _batching             # inside schedule_many / cancel_many: compact at the end
    cdef Py_ssize_t _debug_calls    # TASKWHEEL_DEBUG builds: mutating calls so far

    # -- placement ---------------------------------------------------------------------------
    cdef inline uint64_t _utick(self, int64_t ms) noexcept nogil
    cdef inline uint32_t _slot_for(self, int64_t deadline) noexcept nogil

    # -- the key -> (slot, position) table ---------------------------------------------------
    cdef inline Entry *_entry_of(self, uint64_t bucket) noexcept nogil
    cdef inline Py_ssize_t _key_in(self, const uint64_t *table, uint64_t mask, int64_t key,
                                   uint64_t h) noexcept nogil
    cdef inline Py_ssize_t _loc_in(self, const uint64_t *table, uint64_t mask, uint64_t h,
                                   uint64_t loc) noexcept nogil
    cdef inline Py_ssize_t _find_key(self, int64_t key, uint64_t h) noexcept nogil
    cdef inline Py_ssize_t _find_loc(self, uint64_t h, uint64_t loc) noexcept nogil
    cdef Py_ssize_t _find_key_old(self, int64_t key, uint64_t h) noexcept nogil
    cdef Py_ssize_t _find_loc_old(self, uint64_t h, uint64_t loc) noexcept nogil
    cdef inline bint _take_loc(self, uint64_t h, uint64_t loc) noexcept nogil
    cdef uint64_t _peek_key(self, int64_t key) noexcept nogil
    cdef Py_ssize_t _move_from_old(self, uint64_t j, uint64_t h) noexcept nogil
    cdef void _move_some(self, Py_ssize_t budget) noexcept nogil
    cdef int _insert(self, uint64_t h, uint64_t loc) noexcept nogil
    cdef void _delete_at(self, uint64_t i) noexcept nogil
    cdef inline void _prefetch_bucket(self, int64_t key) noexcept nogil
    cdef inline void _prefetch_buckets(self, const Entry *items, uint32_t n) noexcept nogil
    cdef inline void _prefetch_entry(self, int64_t key) noexcept nogil
    cdef int _rebuild(self, uint64_t capacity, uint64_t extra) noexcept nogil
    cdef int _reserve_table(self, Py_ssize_t count) noexcept nogil
    cdef int _start_growing(self, uint64_t capacity) noexcept nogil
    cdef void _shrink(self) noexcept nogil

    # -- slots -------------------------------------------------------------------------------
    cdef int _reserve_slot(self, uint32_t s, uint64_t count) noexcept nogil
    cdef inline int _append(self, uint32_t s, int64_t key, int64_t deadline, uint32_t *pos) noexcept nogil
    cdef void _reset(self, uint32_t s) noexcept nogil
    cdef void _release(self, uint32_t s) noexcept nogil
    cdef void _end_batch(self) noexcept nogil
    cdef void _compact(self, uint32_t s) noexcept nogil

    # -- schedule and cancel -----------------------------------------------------------------
    cdef int _schedule(self, int64_t key, int64_t deadline) noexcept nogil
    cdef int _cancel(self, int64_t key) noexcept nogil

    # -- advance -----------------------------------------------------------------------------
    cdef int _reserve_out(self, Py_ssize_t n) noexcept nogil
    cdef int _fire_all(self, uint32_t s) noexcept nogil
    cdef int _fire_until(self, uint32_t s, int64_t limit) noexcept nogil
    cdef int _cascade(self, uint32_t s) noexcept nogil
    cdef int _next_event(self, uint64_t *event) noexcept nogil
    cdef inline uint32_t _slot_of_event(self, int k, uint64_t event) noexcept nogil
    cdef int _sort_out(self, Py_ssize_t start) noexcept nogil
    cdef int _advance(self, int64_t now_ms) noexcept nogil
    cdef int64_t _min_live(self, uint32_t s) noexcept nogil

    # -- Python surface ----------------------------------------------------------------------
    cdef void _check_usable(self) except *
    cdef void _debug_check(self) except *
