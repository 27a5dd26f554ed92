# cython: language_level=3
"""Protobuf's wire format, written from C: a growable buffer and the primitives that fill it.

Shared by the compiled encoders of the services (dispatch's deliveries, ingest's Submit
response), which write whole messages' bytes in one call instead of building them through the
protobuf runtime. Everything here is inline, so each encoder compiles it into its own loop.

The encoding follows protobuf's: fields in number order as the encoder writes them, proto3
defaults left out (empty strings and bytes, zero integers); a timestamp is a
google.protobuf.Timestamp of unix milliseconds, its seconds rounded down and its nanos in
[0, 1e9), written whenever the encoder writes it (message fields have presence).
"""
from cpython.mem cimport PyMem_Realloc
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    TAG_SECONDS = 0x08  # google.protobuf.Timestamp.seconds = 1, a varint
    TAG_NANOS = 0x10  # and nanos = 2


cdef struct Out:
    char *data  # PyMem_Realloc'ed; the caller frees it with PyMem_Free
    Py_ssize_t size
    Py_ssize_t capacity


cdef inline int reserve(Out *out, Py_ssize_t more) except -1:
    """Room for ``more`` bytes past ``size``, doubling the buffer (4 KiB at first)."""
    cdef Py_ssize_t want = out.size + more
    cdef Py_ssize_t capacity = out.capacity
    cdef char *grown
    if want <= capacity:
        return 0
    while capacity < want:
        capacity = capacity * 2 if capacity else 4096
    grown = <char *>PyMem_Realloc(out.data, capacity)
    if grown == NULL:
        raise MemoryError()
    out.data = grown
    out.capacity = capacity
    return 0


cdef inline Py_ssize_t varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline void put_varint(Out *out, uint64_t v) noexcept nogil:
    cdef char *p = out.data + out.size
    while v >= 0x80:
        p[0] = <char>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <char>v
    out.size = (p - out.data) + 1


cdef inline void put_bytes(Out *out, const char *data, Py_ssize_t n) noexcept nogil:
    memcpy(out.data + out.size, data, n)
    out.size += n


cdef inline void put_tagged(Out *out, int tag, uint64_t v) noexcept nogil:
    """A one-byte tag, then a varint: an integer field, or the length of a length-delimited one."""
    out.data[out.size] = <char>tag
    out.size += 1
    put_varint(out, v)


cdef inline Py_ssize_t field_size(Py_ssize_t n) noexcept nogil:
    """A length-delimited field of n bytes with a one-byte tag; none when empty (proto3)."""
    return 1 + varint_size(<uint64_t>n) + n if n else 0


cdef inline void put_field(Out *out, int tag, const char *data, Py_ssize_t n) noexcept nogil:
    if n:
        put_tagged(out, tag, <uint64_t>n)
        put_bytes(out, data, n)


cdef inline void split_ms(int64_t ms, int64_t *seconds, int64_t *nanos) noexcept nogil:
    cdef int64_t s = ms / 1000
    cdef int64_t rem = ms - s * 1000
    if rem < 0:  # C division truncates toward zero; a Timestamp's seconds round down
        s -= 1
        rem += 1000
    seconds[0] = s
    nanos[0] = rem * 1_000_000


cdef inline Py_ssize_t timestamp_body_size(int64_t ms) noexcept nogil:
    cdef int64_t seconds, nanos
    cdef Py_ssize_t n = 0
    split_ms(ms, &seconds, &nanos)
    if seconds:
        n += 1 + varint_size(<uint64_t>seconds)  # an int64 below zero takes ten bytes
    if nanos:
        n += 1 + varint_size(<uint64_t>nanos)
    return n


cdef inline void put_timestamp(Out *out, int tag, int64_t ms) noexcept nogil:
    """A Timestamp field of unix milliseconds ``ms``, with its one-byte ``tag``."""
    cdef int64_t seconds, nanos
    split_ms(ms, &seconds, &nanos)
    put_tagged(out, tag, <uint64_t>timestamp_body_size(ms))
    if seconds:
        put_tagged(out, TAG_SECONDS, <uint64_t>seconds)
    if nanos:
        put_tagged(out, TAG_NANOS, <uint64_t>nanos)
