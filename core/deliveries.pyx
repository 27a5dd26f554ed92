# cython: language_level=3, cdivision=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""The wire form of what dispatch sends a worker: one ConsumeResponse of many deliveries.

Dispatch groups fired tasks by destination (a worker's stream) and sends each group as one
message. Building that message through the protobuf runtime cost ~4 us a delivery on the event
loop (a ``deliveries.add(...)`` with keyword arguments, three timestamps merged in, and then
``SerializeToString`` in grpc), which made delivery the largest share of the loop's work per
fired task. Here one call writes the whole message's bytes from the tasks' fields, and grpc
sends them as they are.

The encoding is protobuf's, for taskwheel.v1.ConsumeResponse (field 1: repeated Delivery) and
Delivery (task.proto), fields in number order, proto3 defaults left out as the protobuf
runtime leaves them out (empty strings and bytes, zero integers); the three timestamps are
always present (message fields have presence), holding unix milliseconds as
google.protobuf.Timestamp (seconds rounded down, nanos in [0, 1e9)). Header map entries carry
both key and value. Messages concatenate: the bytes of two responses, one after the other,
parse as one response holding the deliveries of both, which is how queued messages merge.

Cost: attribute reads and copies, O(bytes) per call; one allocation of the result (and a
doubling buffer behind it). Not thread-safe against concurrent mutation of its inputs; it holds
the GIL throughout.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from taskwheel.core.int64 cimport _int64
from taskwheel.core.leases cimport Fired
from taskwheel.core.records cimport RecordShape, read_field

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

# Tags: field number << 3 | wire type (0 varint, 2 length-delimited).
cdef enum:
    TAG_DELIVERIES = 0x0A       # ConsumeResponse.deliveries = 1
    TAG_TASK_ID = 0x0A          # Delivery.task_id = 1
    TAG_DELIVERY_ID = 0x12      # 2
    TAG_QUEUE = 0x1A            # 3
    TAG_PAYLOAD = 0x22          # 4
    TAG_FIRE_AT = 0x2A          # 5
    TAG_ATTEMPT = 0x30          # 6
    TAG_HEADERS = 0x3A          # 7
    TAG_MAX_ATTEMPTS = 0x40     # 8
    TAG_FIRED_AT = 0x4A         # 9
    TAG_LEASE_EXPIRES_AT = 0x52  # 10
    TAG_TRACEPARENT = 0x5A      # 11
    TAG_MAP_KEY = 0x0A          # a map entry's key = 1
    TAG_MAP_VALUE = 0x12        # and value = 2
    TAG_SECONDS = 0x08          # google.protobuf.Timestamp.seconds = 1
    TAG_NANOS = 0x10            # and nanos = 2


_RECORD_FIELDS = ("task_id", "queue", "traceparent", "payload", "fire_at_ms", "attempt", "max_attempts",
                  "headers")


cdef int _reserve(_Out *out, Py_ssize_t more) except -1:
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


cdef Py_ssize_t _varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef void _put_varint(_Out *out, uint64_t v) noexcept nogil:
    cdef char *p = out.data + out.size
    while v >= 0x80:
        p[0] = <char>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <char>v
    out.size = (p - out.data) + 1


cdef void _put_bytes(_Out *out, const char *data, Py_ssize_t n) noexcept nogil:
    memcpy(out.data + out.size, data, n)
    out.size += n


cdef inline void _put_tagged(_Out *out, int tag, uint64_t v) noexcept nogil:
    """A one-byte tag, then a varint: an integer field, or the length of a length-delimited one."""
    out.data[out.size] = <char>tag
    out.size += 1
    _put_varint(out, v)


cdef inline void _split_ms(int64_t ms, int64_t *seconds, int64_t *nanos) noexcept nogil:
    cdef int64_t s = ms / 1000
    cdef int64_t rem = ms - s * 1000
    if rem < 0:  # C division truncates toward zero; a Timestamp's seconds round down
        s -= 1
        rem += 1000
    seconds[0] = s
    nanos[0] = rem * 1_000_000


cdef Py_ssize_t _timestamp_body_size(int64_t ms) noexcept nogil:
    cdef int64_t seconds, nanos
    cdef Py_ssize_t n = 0
    _split_ms(ms, &seconds, &nanos)
    if seconds:
        n += 1 + _varint_size(<uint64_t>seconds)  # an int64 below zero takes ten bytes
    if nanos:
        n += 1 + _varint_size(<uint64_t>nanos)
    return n


cdef void _put_timestamp(_Out *out, int tag, int64_t ms) noexcept nogil:
    cdef int64_t seconds, nanos
    _split_ms(ms, &seconds, &nanos)
    _put_tagged(out, tag, <uint64_t>_timestamp_body_size(ms))
    if seconds:
        _put_tagged(out, TAG_SECONDS, <uint64_t>seconds)
    if nanos:
        _put_tagged(out, TAG_NANOS, <uint64_t>nanos)


cdef inline Py_ssize_t _field_size(Py_ssize_t n) noexcept nogil:
    """A length-delimited field of n bytes with a one-byte tag; none when empty (proto3)."""
    return 1 + _varint_size(<uint64_t>n) + n if n else 0


cdef inline void _put_field(_Out *out, int tag, const char *data, Py_ssize_t n) noexcept nogil:
    if n:
        _put_tagged(out, tag, <uint64_t>n)
        _put_bytes(out, data, n)


cdef inline const char *_utf8(object s, Py_ssize_t *n, str name) except NULL:
    if not PyUnicode_Check(s):
        raise TypeError(f"{name} must be a str, not {type(s).__name__}")
    return PyUnicode_AsUTF8AndSize(s, n)


cdef inline uint32_t _uint32(object value, str name) except? 0xFFFFFFFF:
    cdef int64_t v = _int64(value, name)
    if v < 0 or v > 0xFFFFFFFE:  # attempts are small; 2**32 - 1 is kept as the error value
        raise OverflowError(f"{name} {v} is outside a uint32")
    return <uint32_t>v


def encode_deliveries(list sent, list traceparents=None, RecordShape record=None):
    """The bytes of one taskwheel.v1.ConsumeResponse holding a delivery per item of ``sent``.

    Each item has ``record`` (with ``task_id``, ``queue``, ``payload``, ``fire_at_ms``,
    ``attempt``, ``max_attempts``, ``headers`` (a dict of str) and ``traceparent``, as a
    TaskRecord has), ``delivery_id``, ``fired_at`` (ms) and ``due_ms`` (the lease's expiry, ms).
    ``traceparents``, when given, holds one str per item that replaces the record's.
    ``record``, a RecordShape of the records' type, has their fields read from their slots, and
    an item that is a core.Fired has its own read from C.
    """
    cdef Py_ssize_t i, n = len(sent), pos
    cdef _Out out
    cdef object item, rec, headers, value
    # References held while their UTF-8 buffers are read: an attribute may hand out a new object.
    cdef object task_id_s, delivery_id_s, queue_s, trace_s
    cdef PyObject *k
    cdef PyObject *v
    cdef const char *task_id
    cdef const char *delivery_id
    cdef const char *queue
    cdef const char *payload
    cdef const char *trace
    cdef const char *key
    cdef const char *val
    cdef Py_ssize_t task_id_n, delivery_id_n, queue_n, payload_n, trace_n, kn, vn, entry, size
    cdef int64_t fire_at, fired_at, expires
    cdef uint32_t attempt, max_attempts
    cdef Fired fired
    # The slots of record's fields, in order: task_id, queue, traceparent, payload, fire_at_ms,
    # attempt, max_attempts, headers; kind NULL: every field by getattr.
    cdef Py_ssize_t at[8]
    cdef PyObject *kind = NULL if record is None else record.offsets_of(_RECORD_FIELDS, at)
    if traceparents is not None and len(traceparents) != n:
        raise ValueError(f"{len(traceparents)} traceparents for {n} deliveries")
    out.data = NULL
    out.size = out.capacity = 0
    try:
        _reserve(&out, 160 * n + 64)
        for i in range(n):
            item = sent[i]
            if type(item) is Fired:
                fired = <Fired>item
                rec = fired.record
                delivery_id_s = fired.delivery_id
                fired_at = fired.fired_at
                expires = fired.due_ms
            else:
                rec = item.record
                delivery_id_s = item.delivery_id
                fired_at = _int64(item.fired_at, "fired_at")
                expires = _int64(item.due_ms, "due_ms")
            task_id_s = read_field(rec, kind, at[0], "task_id")
            queue_s = read_field(rec, kind, at[1], "queue")
            trace_s = read_field(rec, kind, at[2], "traceparent") if traceparents is None else traceparents[i]
            task_id = _utf8(task_id_s, &task_id_n, "task_id")
            delivery_id = _utf8(delivery_id_s, &delivery_id_n, "delivery_id")
            queue = _utf8(queue_s, &queue_n, "queue")
            trace = _utf8(trace_s, &trace_n, "traceparent")
            value = read_field(rec, kind, at[3], "payload")
            if not PyBytes_Check(value):
                raise TypeError(f"payload must be bytes, not {type(value).__name__}")
            payload = PyBytes_AS_STRING(value)
            payload_n = PyBytes_GET_SIZE(value)
            fire_at = _int64(read_field(rec, kind, at[4], "fire_at_ms"), "fire_at_ms")
            attempt = _uint32(read_field(rec, kind, at[5], "attempt"), "attempt")
            max_attempts = _uint32(read_field(rec, kind, at[6], "max_attempts"), "max_attempts")
            headers = read_field(rec, kind, at[7], "headers")
            if headers is not None and type(headers) is not dict:
                raise TypeError(f"headers must be a dict, not {type(headers).__name__}")

            size = (_field_size(task_id_n) + _field_size(delivery_id_n) + _field_size(queue_n)
                    + _field_size(payload_n) + _field_size(trace_n))
            size += 3 + _timestamp_body_size(fire_at) + _timestamp_body_size(fired_at) \
                + _timestamp_body_size(expires) + 3  # three tags, three one-byte lengths
            if attempt:
                size += 1 + _varint_size(attempt)
            if max_attempts:
                size += 1 + _varint_size(max_attempts)
            if headers:
                pos = 0
                while PyDict_Next(headers, &pos, &k, &v):
                    _utf8(<object>k, &kn, "a header name")
                    _utf8(<object>v, &vn, "a header value")
                    entry = 2 + _varint_size(kn) + kn + _varint_size(vn) + vn
                    size += 1 + _varint_size(entry) + entry
            _reserve(&out, 1 + _varint_size(size) + size)

            _put_tagged(&out, TAG_DELIVERIES, <uint64_t>size)
            _put_field(&out, TAG_TASK_ID, task_id, task_id_n)
            _put_field(&out, TAG_DELIVERY_ID, delivery_id, delivery_id_n)
            _put_field(&out, TAG_QUEUE, queue, queue_n)
            _put_field(&out, TAG_PAYLOAD, payload, payload_n)
            _put_timestamp(&out, TAG_FIRE_AT, fire_at)
            if attempt:
                _put_tagged(&out, TAG_ATTEMPT, attempt)
            if headers:
                pos = 0
                while PyDict_Next(headers, &pos, &k, &v):
                    key = _utf8(<object>k, &kn, "a header name")
                    val = _utf8(<object>v, &vn, "a header value")
                    entry = 2 + _varint_size(kn) + kn + _varint_size(vn) + vn
                    _put_tagged(&out, TAG_HEADERS, <uint64_t>entry)
                    _put_tagged(&out, TAG_MAP_KEY, <uint64_t>kn)
                    _put_bytes(&out, key, kn)
                    _put_tagged(&out, TAG_MAP_VALUE, <uint64_t>vn)
                    _put_bytes(&out, val, vn)
            if max_attempts:
                _put_tagged(&out, TAG_MAX_ATTEMPTS, max_attempts)
            _put_timestamp(&out, TAG_FIRED_AT, fired_at)
            _put_timestamp(&out, TAG_LEASE_EXPIRES_AT, expires)
            _put_field(&out, TAG_TRACEPARENT, trace, trace_n)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        PyMem_Free(out.data)
