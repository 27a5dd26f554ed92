# cython: language_level=3
"""The one conversion of a Python integer argument to int64 the core's modules share.

Declarations only (inline, no module of its own): cimported by wheel, batcher and sharding.
"""
from libc.stdint cimport int64_t

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
