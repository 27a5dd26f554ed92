# cython: language_level=3, cdivision=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""Where a task lives: its shard (from its id) and its minute bucket (from its due time).

The shard hash is FNV-1a 64 over the id's UTF-8 bytes, reduced modulo the shard count. It is
fixed forever: stores partition rows by it and every process on every machine must agree, which
rules out Python's salted hash(). Changing it would strand every stored task.
"""
from cpython cimport array
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint64_t

import array as _array

# sharding.pxd declares the hash's constants and the inline helpers (_fnv1a, _shard, _int64).

BUCKET_MS = 60_000

cdef array.array _SHARDS_TEMPLATE = _array.array("q")


def shard_of(task_id, num_shards):
    """The shard (0 <= shard < num_shards) of a task id; stable across processes and machines."""
    return _shard(task_id, _shard_count(num_shards))


def shards_of(task_ids, num_shards):
    """shard_of() for each id of a list (or any sequence) of str, as array('q')."""
    cdef Py_ssize_t i, n
    cdef array.array out
    cdef int64_t *dst
    cdef uint64_t shards = _shard_count(num_shards)
    cdef list ids = task_ids if type(task_ids) is list else list(task_ids)
    n = len(ids)
    out = array.clone(_SHARDS_TEMPLATE, n, False)
    dst = <int64_t *>out.data.as_voidptr
    for i in range(n):
        dst[i] = _shard(ids[i], shards)
    return out


def bucket_of(due_ms):
    """The minute bucket holding a due time: due_ms // 60000, rounding down for negative times."""
    cdef int64_t ms = _int64(due_ms, "due_ms")
    cdef int64_t q = ms / 60000
    if ms % 60000 < 0:
        q -= 1
    return q
