# cython: language_level=3
"""C-level declarations of records.pyx: a RecordShape's fields, for the compiled reader that
fills records from its buffers (sqlite_rows.pyx)."""


cdef class RecordShape:
    cdef readonly type kind
    cdef readonly tuple fields
    cdef readonly Py_ssize_t count
    cdef Py_ssize_t *offsets  # of each field's slot in an instance, in field order
    cdef list converters

    cdef object new_instance(self)
    cdef int put(self, object obj, Py_ssize_t i, object value) except -1
