# cython: language_level=3
"""C-level declarations of records.pyx: a RecordShape's fields, for the compiled reader that
fills records from its buffers (sqlite_rows.pyx), and a slot read for the loops that read them
(leases.pyx, deliveries.pyx)."""
from cpython.object cimport PyObject, Py_TYPE

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)
    int PyObject_GC_IsTracked(object op)


cdef class RecordShape:
    cdef readonly type kind
    cdef readonly tuple fields
    cdef readonly Py_ssize_t count
    cdef Py_ssize_t total  # count, plus the slots given defaults
    cdef tuple names  # fields, then the slots given defaults
    cdef tuple default_values  # of those slots, in order
    cdef Py_ssize_t *offsets  # of each slot in an instance: fields in order, then the defaulted
    cdef list converters

    cdef object new_instance(self)
    cdef int put(self, object obj, Py_ssize_t i, object value) except -1
    cdef PyObject *offsets_of(self, tuple names, Py_ssize_t *offsets) except NULL
    cdef int positions_of(self, tuple names, Py_ssize_t *positions) except -1
    cpdef object copy(self, object obj)


cdef inline object read_field(object obj, PyObject *kind, Py_ssize_t offset, str name):
    """``getattr(obj, name)``, read straight from its slot at ``offset`` when ``obj`` is exactly
    of type ``kind`` (a RecordShape's, see ``offset_of``). From compiled code a getattr is a
    generic lookup (type, descriptor, member) of ~25 ns; the slot is one load."""
    cdef PyObject *value
    if <PyObject *>Py_TYPE(obj) == kind:
        value = (<PyObject **>((<char *><PyObject *>obj) + offset))[0]
        if value == NULL:
            raise AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
        return <object>value
    return getattr(obj, name)


cdef inline void untrack_container(object container) noexcept:
    """Out of the cyclic GC's view, for a list the caller fills with untracked objects only
    (see untrack_list)."""
    if PyObject_GC_IsTracked(container):
        PyObject_GC_UnTrack(<PyObject *>container)
