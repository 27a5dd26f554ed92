# cython: language_level=3
"""C-level declarations of wheel.pyx: the layout of a TimingWheel, its C methods, and the inline
helpers they share. The algorithm and its contracts are described in wheel.pyx."""
cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t

from taskwheel.core.keytable cimport Entry, KeyTable, Slot

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__GNUC__) || defined(__clang__)
      #define TW_CLZ64(x) __builtin_clzll(x)
      #define TW_CTZ64(x) __builtin_ctzll(x)
    #else
      static inline int tw_clz64(uint64_t x) { int n = 0; while (!(x >> 63)) { x <<= 1; n++; } return n; }
      static inline int tw_ctz64(uint64_t x) { int n = 0; while (!(x & 1)) { x >>= 1; n++; } return n; }
      #define TW_CLZ64(x) tw_clz64(x)
      #define TW_CTZ64(x) tw_ctz64(x)
    #endif
    #ifdef TASKWHEEL_DEBUG
      #define TW_DEBUG 1
    #else
      #define TW_DEBUG 0
    #endif
    #define TW_SIGN (1ULL << 63)
    #ifndef TW_PREFETCH_AHEAD
    #define TW_PREFETCH_AHEAD 32  /* entries ahead: more than one memory latency of loop work */
    #endif
    """
    int TW_CLZ64(uint64_t x) noexcept nogil
    int TW_CTZ64(uint64_t x) noexcept nogil
    const bint TW_DEBUG
    const uint64_t TW_SIGN
    const Py_ssize_t TW_PREFETCH_AHEAD


# -- C-level layout ------------------------------------------------------------------------

cdef enum:
    LEVELS = 8              # 8 levels x 8 bits of tick cover the whole int64 range
    LEVEL_BITS = 8
    LEVEL_SLOTS = 256
    OVERDUE = 2048          # slot id of the list of timers already due (deadline <= wheel time)
    NSLOTS = 2049           # LEVELS * LEVEL_SLOTS level slots, then OVERDUE
    BITMAP_WORDS = 33       # one bit per slot id: which level slots hold live timers


cdef enum:
    COMPACT_MIN = 64          # slots smaller than this are never compacted
    KEEP_CAPACITY = 512       # an emptied slot keeps its array up to this many entries
    KEEP_OUT = 65536          # the fired-timer buffer is freed after advances larger than this


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
    cdef KeyTable _table            # key -> (slot, position) of its entry; keytable.pyx
    cdef Entry *_out                # fired timers of the current advance
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap
    cdef Entry *_tmp                # merge-sort scratch
    cdef Py_ssize_t _tmp_cap
    cdef bint _next_valid           # _next_ms holds the earliest deadline (when a timer is pending)
    cdef int64_t _next_ms
    cdef bint _broken               # an allocation failed half-way through an update (_table.lost too)
    cdef bint _batching             # inside schedule_many / cancel_many: compact at the end
    cdef Py_ssize_t _debug_calls    # TASKWHEEL_DEBUG builds: mutating calls so far

    # -- placement ---------------------------------------------------------------------------
    cdef inline uint64_t _utick(self, int64_t ms) noexcept nogil
    cdef inline uint32_t _slot_for(self, int64_t deadline) noexcept nogil

    # -- slots -------------------------------------------------------------------------------
    cdef inline void _prefetch_buckets(self, const Entry *items, uint32_t n) noexcept nogil
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
