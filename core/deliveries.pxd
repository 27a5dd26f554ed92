# cython: language_level=3
"""C-level declarations of deliveries.pyx: the growable output buffer and the wire primitives."""
from libc.stdint cimport int64_t, uint64_t


cdef struct _Out:
    char *data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _reserve(_Out *out, Py_ssize_t more) except -1
cdef Py_ssize_t _varint_size(uint64_t v) noexcept nogil
cdef void _put_varint(_Out *out, uint64_t v) noexcept nogil
cdef void _put_bytes(_Out *out, const char *data, Py_ssize_t n) noexcept nogil
cdef Py_ssize_t _timestamp_body_size(int64_t ms) noexcept nogil
cdef void _put_timestamp(_Out *out, int tag, int64_t ms) noexcept nogil
