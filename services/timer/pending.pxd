# cython: language_level=3
"""C-level declarations of pending.pyx: a PendingTasks' wheel, its cells and its split dict."""
from cpython.object cimport PyObject
from libc.stdint cimport int64_t

from taskwheel.core.wheel cimport TimingWheel


cdef class PendingTasks:
    cdef readonly TimingWheel wheel  # for reading (len, next_deadline): scheduling goes through admit
    cdef list _keys  # task_id -> wheel key, the index of the task's cell: a split dict (idshards.pxd)
    cdef PyObject **_cells  # wheel key -> the record held (a reference), NULL when free
    cdef Py_ssize_t _cells_used  # cells ever handed out: every key is below this
    cdef Py_ssize_t _cells_cap
    cdef int64_t *_free  # keys of emptied cells, reused first (capacity: _cells_cap)
    cdef Py_ssize_t _free_count
    cdef Py_ssize_t _count  # records held
    # Records of this type have task_id, gen and due_ms read from their slots (at these
    # offsets) instead of by getattr; NULL: always by getattr.
    cdef PyObject *_kind
    cdef object _record  # the RecordShape, which holds _kind alive
    cdef Py_ssize_t _at[3]  # task_id, gen, due_ms

    cdef int64_t _take_cell(self, object rec) except -1
    cdef inline void _release_cell(self, int64_t key) noexcept
