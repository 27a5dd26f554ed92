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
from cpython.mem cimport PyMem_Free
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint32_t, uint64_t

from taskwheel.core.int64 cimport _int64
from taskwheel.core.protowire cimport (Out, field_size, put_bytes, put_field, put_tagged, put_timestamp, reserve,
                                      timestamp_body_size, varint_size)
from taskwheel.core.records cimport RecordShape, read_field
from taskwheel.dispatch.leases cimport Fired

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

_RECORD_FIELDS = ("task_id", "queue", "traceparent", "payload", "fire_at_ms", "attempt", "max_attempts",
                  "headers", "redelivered", "owner_epoch")


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
    ``attempt``, ``max_attempts``, ``headers`` (a dict of str), ``traceparent``,
    ``redelivered`` and ``owner_epoch``, as a TaskRecord has; a delivery is flagged redelivered
    when its record is or its attempt is above 1), ``delivery_id``, ``fired_at`` (ms) and ``due_ms`` (the lease's expiry, ms).
    ``traceparents``, when given, holds one str per item that replaces the record's.
    ``record``, a RecordShape of the records' type, has their fields read from their slots, and
    an item that is a leases.Fired has its own read from C.
    """
    cdef Py_ssize_t i, n = len(sent), pos
    cdef Out out
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
    cdef bint redelivered
    cdef uint64_t owner_epoch
    cdef Fired fired
    # The slots of record's fields, in order: task_id, queue, traceparent, payload, fire_at_ms,
    # attempt, max_attempts, headers, redelivered, owner_epoch; kind NULL: every field by getattr.
    cdef Py_ssize_t at[10]
    cdef PyObject *kind = NULL if record is None else record.offsets_of(_RECORD_FIELDS, at)
    if traceparents is not None and len(traceparents) != n:
        raise ValueError(f"{len(traceparents)} traceparents for {n} deliveries")
    out.data = NULL
    out.size = out.capacity = 0
    try:
        reserve(&out, 160 * n + 64)
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
            redelivered = attempt > 1 or read_field(rec, kind, at[8], "redelivered") is True
            value = read_field(rec, kind, at[9], "owner_epoch")
            owner_epoch = <uint64_t>_int64(value, "owner_epoch") if value else 0

            size = (field_size(task_id_n) + field_size(delivery_id_n) + field_size(queue_n)
                    + field_size(payload_n) + field_size(trace_n))
            size += 3 + timestamp_body_size(fire_at) + timestamp_body_size(fired_at) \
                + timestamp_body_size(expires) + 3  # three tags, three one-byte lengths
            if attempt:
                size += 1 + varint_size(attempt)
            if max_attempts:
                size += 1 + varint_size(max_attempts)
            if redelivered:
                size += 2
            if owner_epoch:
                size += 1 + varint_size(owner_epoch)
            if headers:
                pos = 0
                while PyDict_Next(headers, &pos, &k, &v):
                    _utf8(<object>k, &kn, "a header name")
                    _utf8(<object>v, &vn, "a header value")
                    entry = 2 + varint_size(kn) + kn + varint_size(vn) + vn
                    size += 1 + varint_size(entry) + entry
            reserve(&out, 1 + varint_size(size) + size)

            put_tagged(&out, TAG_DELIVERIES, <uint64_t>size)
            put_field(&out, TAG_TASK_ID, task_id, task_id_n)
            put_field(&out, TAG_DELIVERY_ID, delivery_id, delivery_id_n)
            put_field(&out, TAG_QUEUE, queue, queue_n)
            put_field(&out, TAG_PAYLOAD, payload, payload_n)
            put_timestamp(&out, TAG_FIRE_AT, fire_at)
            if attempt:
                put_tagged(&out, TAG_ATTEMPT, attempt)
            if headers:
                pos = 0
                while PyDict_Next(headers, &pos, &k, &v):
                    key = _utf8(<object>k, &kn, "a header name")
                    val = _utf8(<object>v, &vn, "a header value")
                    entry = 2 + varint_size(kn) + kn + varint_size(vn) + vn
                    put_tagged(&out, TAG_HEADERS, <uint64_t>entry)
                    put_tagged(&out, TAG_MAP_KEY, <uint64_t>kn)
                    put_bytes(&out, key, kn)
                    put_tagged(&out, TAG_MAP_VALUE, <uint64_t>vn)
                    put_bytes(&out, val, vn)
            if max_attempts:
                put_tagged(&out, TAG_MAX_ATTEMPTS, max_attempts)
            put_timestamp(&out, TAG_FIRED_AT, fired_at)
            put_timestamp(&out, TAG_LEASE_EXPIRES_AT, expires)
            put_field(&out, TAG_TRACEPARENT, trace, trace_n)
            if redelivered:
                put_tagged(&out, TAG_REDELIVERED, 1)
            if owner_epoch:
                put_tagged(&out, TAG_OWNER_EPOCH, owner_epoch)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        PyMem_Free(out.data)
