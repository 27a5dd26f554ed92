# cython: language_level=3, cdivision=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""Groups items by destination for the write and dispatch paths.

Items accumulate per partition (any hashable: a (shard, minute bucket) tuple for the store, a
queue name for dispatch). A group leaves when it holds ``max_items`` (``add`` hands it back at
once) or when its oldest item is ``max_delay_ms`` old (``due`` hands it back). Groups sit in a
list ordered by the time of their first item, so ``due`` and ``next_flush_ms`` touch only the
groups they return: O(1) per item added and per group flushed. Not thread-safe: one owner.
"""
cimport cython
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport INT64_MAX, int64_t, uint64_t

# batcher.pxd declares the fields and C methods of Batcher and _Group, and the inline helpers.


@cython.final
@cython.freelist(64)
cdef class _Group:
    """One partition's pending items, linked into the Batcher's list ordered by first_ms."""


@cython.final
cdef class Batcher:
    """Batches of at most max_items items per partition, none older than max_delay_ms."""

    def __cinit__(self, max_items, max_delay_ms):
        cdef int64_t items = _int64(max_items, "max_items"), delay = _int64(max_delay_ms, "max_delay_ms")
        if items < 1:
            raise ValueError(f"max_items must be at least 1, got {items}")
        if delay < 0:
            raise ValueError(f"max_delay_ms must not be negative, got {delay}")
        self.max_items = <Py_ssize_t>min(items, <int64_t>PY_SSIZE_T_MAX)
        self.max_delay_ms = delay
        self._groups = {}

    cdef _Group _open(self, object partition, object item, int64_t now_ms):
        cdef _Group g = _Group.__new__(_Group)
        cdef _Group after = self._youngest
        g.partition = partition
        g.items = [item]
        g.first_ms = now_ms
        self._groups[partition] = g      # raises TypeError for an unhashable partition
        # A clock that steps back walks the list; a monotonic one appends at once.
        while after is not None and after.first_ms > now_ms:
            after = after.older
        g.older = after
        if after is None:
            g.younger = self._oldest
            self._oldest = g
        else:
            g.younger = after.younger
            after.younger = g
        if g.younger is None:
            self._youngest = g
        else:
            g.younger.older = g
        return g

    cdef tuple _take(self, _Group g):
        if g.older is None:
            self._oldest = g.younger
        else:
            g.older.younger = g.younger
        if g.younger is None:
            self._youngest = g.older
        else:
            g.younger.older = g.older
        g.older = g.younger = None
        del self._groups[g.partition]
        self._count -= len(g.items)
        return (g.partition, g.items)

    cdef inline object _add(self, object partition, object item, int64_t now_ms):
        cdef _Group g
        cdef object found = self._groups.get(partition)
        if found is None:
            if self.max_items == 1:
                return (partition, [item])
            self._open(partition, item, now_ms)
            self._count += 1
            return None
        g = <_Group>found
        g.items.append(item)
        self._count += 1
        if len(g.items) >= self.max_items:
            return self._take(g)
        return None

    cdef inline bint _is_due(self, int64_t first_ms, int64_t now_ms) noexcept:
        return now_ms >= first_ms and <uint64_t>now_ms - <uint64_t>first_ms >= <uint64_t>self.max_delay_ms

    def add(self, partition, item, now_ms):
        """Adds an item; returns (partition, items) when that group just filled, else None."""
        return self._add(partition, item, _int64(now_ms, "now_ms"))

    def add_many(self, partitions, items, now_ms):
        """add() for each (partition, item) pair; returns the groups that filled, in order."""
        cdef list ps = partitions if type(partitions) is list else list(partitions)
        cdef list xs = items if type(items) is list else list(items)
        cdef Py_ssize_t i, n = len(ps)
        cdef list full = []
        cdef object batch
        cdef int64_t now = _int64(now_ms, "now_ms")
        if len(xs) != n:
            raise ValueError(f"partitions and items differ in length: {n} != {len(xs)}")
        for i in range(n):
            batch = self._add(ps[i], xs[i], now)
            if batch is not None:
                full.append(batch)
        return full

    def due(self, now_ms):
        """Removes and returns the groups whose oldest item is max_delay_ms old, oldest first."""
        cdef int64_t now = _int64(now_ms, "now_ms")
        cdef list out = []
        while self._oldest is not None and self._is_due(self._oldest.first_ms, now):
            out.append(self._take(self._oldest))
        return out

    def drain(self):
        """Removes and returns every group, oldest first."""
        cdef list out = []
        while self._oldest is not None:
            out.append(self._take(self._oldest))
        return out

    def next_flush_ms(self):
        """When the oldest group falls due, or None when nothing is waiting."""
        if self._oldest is None:
            return None
        if self._oldest.first_ms > INT64_MAX - self.max_delay_ms:
            return INT64_MAX
        return self._oldest.first_ms + self.max_delay_ms

    @property
    def groups(self):
        """How many partitions hold items."""
        return len(self._groups)

    def __len__(self):
        return self._count

    def __repr__(self):
        return (f"Batcher(max_items={self.max_items}, max_delay_ms={self.max_delay_ms}, "
                f"items={self._count}, groups={len(self._groups)})")


def group_by(keys, items):
    """{key: [items with that key, in order]}, keys in order of first appearance."""
    cdef list ks = keys if type(keys) is list else list(keys)
    cdef list xs = items if type(items) is list else list(items)
    cdef Py_ssize_t i, n = len(ks)
    cdef dict groups = {}
    cdef object found
    if len(xs) != n:
        raise ValueError(f"keys and items differ in length: {n} != {len(xs)}")
    for i in range(n):
        found = groups.get(ks[i])
        if found is None:
            groups[ks[i]] = [xs[i]]
        else:
            (<list>found).append(xs[i])
    return groups
