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

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL

cdef extern from *:
    """
    #define TW_FNV_OFFSET 0xcbf29ce484222325ULL
    #define TW_FNV_PRIME 0x100000001b3ULL
    """
    const uint64_t TW_FNV_OFFSET
    const uint64_t TW_FNV_PRIME


cdef extern from "Python.h":
    bint PyIndex_Check(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1


cdef inline int64_t _int64(object value, str name) except? -1:
    """An int (or any __index__ integer such as numpy.int64) as int64; floats are TypeErrors."""
    cdef int overflow = 0
    cdef long long v
    if not isinstance(value, int):
        if not PyIndex_Check(value):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        value = value.__index__()
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise OverflowError(f"{name} {value} does not fit in int64")
    return v


BUCKET_MS = 60_000

cdef array.array _SHARDS_TEMPLATE = _array.array("q")


cdef inline uint64_t _fnv1a(const char *data, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = TW_FNV_OFFSET
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>data[i]) * TW_FNV_PRIME
    return h


cdef inline int64_t _shard(object task_id, uint64_t num_shards) except -1:
    cdef Py_ssize_t n
    cdef const char *data
    if not PyUnicode_Check(task_id):
        raise TypeError(f"task_id must be str, not {type(task_id).__name__}")
    data = PyUnicode_AsUTF8AndSize(task_id, &n)
    return <int64_t>(_fnv1a(data, n) % num_shards)


cdef inline uint64_t _shard_count(object num_shards) except 0:
    cdef int64_t n = _int64(num_shards, "num_shards")
    if n <= 0:
        raise ValueError(f"num_shards must be positive, got {n}")
    return <uint64_t>n


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
