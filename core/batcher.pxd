# cython: language_level=3
"""C-level declarations of batcher.pyx: the fields and C methods of Batcher and its group list."""
cimport cython
from libc.stdint cimport int64_t

from taskwheel.core.int64 cimport _int64


@cython.final
cdef class _Group:
    cdef object partition
    cdef list items
    cdef int64_t first_ms
    cdef _Group older
    cdef _Group younger


@cython.final
cdef class Batcher:
    cdef readonly Py_ssize_t max_items
    cdef readonly int64_t max_delay_ms
    cdef dict _groups               # partition -> _Group
    cdef _Group _oldest             # groups ordered by first_ms, ties by arrival
    cdef _Group _youngest
    cdef Py_ssize_t _count

    cdef _Group _open(self, object partition, object item, int64_t now_ms)
    cdef tuple _take(self, _Group g)
    cdef inline object _add(self, object partition, object item, int64_t now_ms)
    cdef inline bint _is_due(self, int64_t first_ms, int64_t now_ms) noexcept
