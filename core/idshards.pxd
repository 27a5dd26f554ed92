# cython: language_level=3
"""A dict keyed by task id, kept as 64 dicts split by the key's hash: what the core's big
id-keyed tables are (the timer's pending ids, dispatch's finished memory).

Why split: a CPython dict that outgrows its table, or whose deletes fill it with dummies, is
rebuilt whole inside the one insert that tips it, and the event loop waits for it: tens of
milliseconds for a dict of 700,000 task ids. Split 64 ways, each piece rebuilds on its own at
1/64 of the size, so the longest step is a 64th of that, and the page faults of a new table
come a piece at a time, too.

The piece is picked by the hash's top six bits: the pieces' own tables index by the low bits,
and the finished memory's Bloom filter (services/dispatch/leases.pyx) uses bits 0-53.

Declarations only (inline, no module of its own).
"""
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject_Hash
from libc.stdint cimport uint64_t

cdef enum:
    ID_SHARD_BITS = 6
    ID_SHARDS = 1 << ID_SHARD_BITS


cdef inline list id_shards():
    """A new, empty split dict: ID_SHARDS dicts."""
    return [{} for _ in range(ID_SHARDS)]


cdef inline dict id_shard_of_hash(list shards, Py_hash_t h):
    """The dict of ``shards`` that holds a key of hash ``h`` if any does, for a caller that
    has the hash already."""
    return <dict>PyList_GET_ITEM(shards, <Py_ssize_t>((<uint64_t>h) >> (64 - ID_SHARD_BITS)))


cdef inline dict id_shard(list shards, object key):
    """The dict of ``shards`` that holds ``key`` if any does (``shards`` from id_shards)."""
    return id_shard_of_hash(shards, PyObject_Hash(key))


cdef inline Py_ssize_t id_shards_len(list shards) except -1:
    """How many keys the split dict holds."""
    cdef Py_ssize_t n = 0
    for d in shards:
        n += len(<dict>d)
    return n
