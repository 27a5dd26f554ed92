# cython: language_level=3
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""Task records out of the cyclic garbage collector's view.

A TaskRecord holds strings, integers, bytes and a dict of strings: nothing that can lead back
to it, so it can never be part of a reference cycle, and reference counting alone frees it. The
collector tracks it all the same (a class with __slots__ is a GC type), and a young collection
visits each of its 17 fields, a cache miss per field: 1.3 us a record on the 2-core test
machine, so a collection of 30,000-56,000 young objects, 80 % of them records loaded ahead of
their due time, paused the event loop for 36-74 ms (at 10K tasks/s, with collections every
50,000 net new objects). Untracked, a record costs the collector nothing.

Untracking is safe for any object: it is still freed by reference counting, only a cycle through
it could no longer be found. Only objects of the types given are untracked, so a caller cannot
take a container that may hold cycles out of the collector's view by mistake.
"""
from cpython.object cimport PyObject, PyTypeObject

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)
    int PyObject_GC_IsTracked(object op)


def untrack(list objects, type kind):
    """Takes every object of ``objects`` that is exactly of type ``kind`` out of the cyclic GC's
    view; returns how many were tracked before."""
    cdef Py_ssize_t i, n = len(objects), untracked = 0
    cdef object o
    for i in range(n):
        o = objects[i]
        if type(o) is kind and PyObject_GC_IsTracked(o):
            PyObject_GC_UnTrack(<PyObject *>o)
            untracked += 1
    return untracked
