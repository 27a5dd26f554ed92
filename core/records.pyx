# cython: language_level=3
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""Task records out of the cyclic garbage collector's view.

A TaskRecord holds strings, integers, bytes and a dict of strings: nothing that can lead back
to it, so it can never be part of a reference cycle, and reference counting alone frees it. The
collector tracks it all the same (a class with __slots__ is a GC type), and a young collection
visits each of its 17 fields, a cache miss per field, about a microsecond a record: with tens
of thousands of records loaded ahead of their due time, most of what a young collection walks,
each collection paused the event loop for tens of milliseconds. Untracked, a record costs the
collector nothing.

Untracking is safe for any object: it is still freed by reference counting, only a cycle through
it could no longer be found. ``untrack`` takes only objects of the types given, so a caller
cannot take a container that may hold cycles out of the collector's view by mistake;
``untrack_list`` takes a list only when nothing in it can lead to such a cycle, and the
compiled loops untrack the lists they fill with untracked objects only.
"""
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdlib cimport free, malloc

cdef extern from "Python.h":
    object PyType_GenericAlloc(PyTypeObject *kind, Py_ssize_t items)
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef int _T_OBJECT_EX = 16  # structmember.h: a slot holding any object, AttributeError when unset
cdef int _READONLY = 1


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


def untrack_list(list objects):
    """Takes the list itself out of the cyclic GC's view when none of its objects is tracked
    and none is a dict (an untracked dict is tracked again once given a tracked value); returns
    whether it did (False leaves the list as it was: a list untracked before stays so).

    A cycle the collector can find is made of tracked objects only, and a list's references
    are its items: when none of them is tracked, no such cycle passes through the list, and
    tracking it finds nothing. It only costs: a young
    collection visits every item of every young list, a cache miss per item for the lists of
    records, task ids, transitions and leases the fire path holds for milliseconds to seconds
    (hundreds of thousands of items at 50K fires/s). Put only untracked objects in it
    afterwards (records built by a RecordShape, strings, numbers, Fired)."""
    cdef Py_ssize_t i, n = len(objects)
    for i in range(n):
        if PyObject_GC_IsTracked(objects[i]) or isinstance(objects[i], dict):
            return False
    untrack_container(objects)
    return True


cdef class RecordShape:
    """How to build instances of a class with ``__slots__`` from values in column order, without
    calling its ``__init__``, already out of the cyclic GC's view (see ``untrack`` for why that
    is safe for records).

    A dataclass's generated ``__init__`` is Python: building a TaskRecord through it, with
    the state and headers converted on the way, cost 2.2 us of the store's reader thread per
    row, holding the GIL the event loop needs; filling the slots from C costs a fraction.

    ``fields`` names the slots of ``kind`` whose values come, in their order; ``defaults``
    maps each other slot to the value every new instance starts with (immutable values only:
    every instance shares it). ``converters``, one per field (None: the value as it is), is a
    dict (the value becomes ``converter[value]``) or a callable (``converter(value)``).
    Refused: a class with its own ``__new__`` or ``__post_init__``, a field that is not a
    writable object slot, or a slot neither named nor defaulted, since a slot never set would
    raise AttributeError when read.
    """

    def __cinit__(self, type kind, fields, converters=None, defaults=None):
        defaults = dict(defaults or {})
        self.count = len(tuple(fields))
        names = tuple(fields) + tuple(defaults)
        self.total = len(names)
        self.names = names
        self.default_values = tuple(defaults.values())
        self.offsets = <Py_ssize_t *>malloc(max(self.total, 1) * sizeof(Py_ssize_t))
        if self.offsets == NULL:
            raise MemoryError()
        if kind.__new__ is not object.__new__ or hasattr(kind, "__post_init__"):
            raise TypeError(f"{kind.__name__} has its own __new__ or __post_init__: call it instead")
        slots = set()
        for klass in kind.__mro__:
            declared = klass.__dict__.get("__slots__", ())
            slots.update((declared,) if isinstance(declared, str) else declared)
        if set(names) != slots or len(set(names)) != self.total:
            raise TypeError(f"fields and defaults must name each slot of {kind.__name__} once: {sorted(slots)}")
        cdef PyMemberDef *member
        for i, name in enumerate(names):
            descriptor = getattr(kind, name)
            if type(descriptor).__name__ != "member_descriptor":
                raise TypeError(f"{kind.__name__}.{name} is not a slot")
            member = (<PyMemberDescrObject *><PyObject *>descriptor).d_member
            if member.type != _T_OBJECT_EX or member.flags & _READONLY:
                raise TypeError(f"{kind.__name__}.{name} is not a writable object slot")
            self.offsets[i] = member.offset
        converters = [None] * self.count if converters is None else list(converters)
        if len(converters) != self.count:
            raise ValueError(f"{len(converters)} converters for {self.count} fields")
        for name, converter in zip(names, converters):
            if converter is not None and not isinstance(converter, dict) and not callable(converter):
                raise TypeError(f"the converter of {name} is neither a dict nor callable")
        self.kind = kind
        self.fields = names[:self.count]
        self.converters = converters

    def __dealloc__(self):
        free(self.offsets)

    cdef object new_instance(self):
        obj = PyType_GenericAlloc(<PyTypeObject *>self.kind, 0)
        PyObject_GC_UnTrack(<PyObject *>obj)
        cdef Py_ssize_t i
        cdef PyObject **slot
        for i in range(self.count, self.total):
            value = self.default_values[i - self.count]
            slot = <PyObject **>((<char *><PyObject *>obj) + self.offsets[i])
            Py_INCREF(value)
            slot[0] = <PyObject *>value
        return obj

    cdef int put(self, object obj, Py_ssize_t i, object value) except -1:
        converter = self.converters[i]
        if converter is not None:
            value = (<dict>converter)[value] if type(converter) is dict else converter(value)
        cdef PyObject **slot = <PyObject **>((<char *><PyObject *>obj) + self.offsets[i])
        cdef PyObject *old = slot[0]
        Py_INCREF(value)
        slot[0] = <PyObject *>value
        Py_XDECREF(old)
        return 0

    cdef PyObject *offsets_of(self, tuple names, Py_ssize_t *offsets) except NULL:
        """Where the slots of the fields ``names`` lie in an instance, into ``offsets``; returns
        the type whose instances have them there (``read_field``'s ``kind``, held by self)."""
        for i, name in enumerate(names):
            try:
                offsets[i] = self.offsets[self.names.index(name)]
            except ValueError:
                raise ValueError(f"{self.kind.__name__} has no field {name!r}") from None
        return <PyObject *>self.kind

    cdef int positions_of(self, tuple names, Py_ssize_t *positions) except -1:
        """The field number of each of ``names``, into ``positions`` (``put``'s ``i``)."""
        for i, name in enumerate(names):
            try:
                positions[i] = self.fields.index(name)
            except ValueError:
                raise ValueError(f"{self.kind.__name__} has no field {name!r}") from None
        return 0

    cpdef object copy(self, object obj):
        """A new instance holding the same values as ``obj`` (exactly of ``kind``), slot by slot,
        out of the cyclic GC's view: what ``copy.copy`` does, without its generic protocol."""
        if type(obj) is not self.kind:
            raise TypeError(f"copy takes a {self.kind.__name__}, not {type(obj).__name__}")
        new = PyType_GenericAlloc(<PyTypeObject *>self.kind, 0)
        PyObject_GC_UnTrack(<PyObject *>new)
        cdef Py_ssize_t i
        cdef PyObject **src
        cdef PyObject **dst
        for i in range(self.total):
            src = <PyObject **>((<char *><PyObject *>obj) + self.offsets[i])
            if src[0] == NULL:
                raise AttributeError(f"{self.kind.__name__}.{self.names[i]} is not set")
            dst = <PyObject **>((<char *><PyObject *>new) + self.offsets[i])
            Py_INCREF(<object>src[0])
            dst[0] = src[0]
        return new

    def build(self, values):
        """One instance from a sequence of ``count`` values (the compiled reader fills them
        from its buffers instead; this is for tests and Python callers)."""
        if len(values) != self.count:
            raise ValueError(f"{len(values)} values for {self.count} fields")
        obj = self.new_instance()
        for i, value in enumerate(values):
            self.put(obj, i, value)
        return obj
