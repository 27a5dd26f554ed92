# cython: language_level=3
"""C-level declarations of sharding.pyx: the FNV-1a constants and the inline helpers of the shard
hash. The hash is fixed forever (see sharding.pyx): stored rows are partitioned by it."""
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint64_t

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL

cdef extern from *:
    """
    #define TW_FNV_OFFSET 0xcbf29ce484222325ULL
    #define TW_FNV_PRIME 0x100000001b3ULL
    """
    const uint64_t TW_FNV_OFFSET
    const uint64_t TW_FNV_PRIME


from taskwheel.core.int64 cimport _int64


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
