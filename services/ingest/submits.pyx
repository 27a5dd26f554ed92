# cython: language_level=3, cdivision=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""Submit's wire form, read and written in C: the fast path of Ingest.Submit.

Reading a SubmitRequest through protobuf's Python API and validating it field by field cost
the event loop 3.3 us a task (1.4 of them attribute reads on the parsed messages), and building
the response 1.0 more; at 90K tasks/s that was most of the loop. ``records_of_submit`` reads
the request's bytes directly and builds the TaskRecords of its tasks when it can vouch for
every one of them; ``encode_submit_results`` writes the response bytes.

The contract, which keeps this short: ``records_of_submit`` returns the records that
``records_of_specs(SubmitRequest.FromString(raw).tasks, ...)`` would return, or None, and
then the caller takes that slow path, which also words every error. None comes for anything
it does not handle the way protobuf and the validator do, and for any task the validator
might refuse:

* a field it does not know, at any level, or a known one with an unexpected wire type;
* a message field (fire_at, delay, lease) twice in one task (protobuf merges them), or both
  fire_at and delay (protobuf keeps the last);
* bytes that are not UTF-8 in a string field;
* a negative nanos in a delay or lease (Python floors the division, this does not try);
* any limit it cannot show is kept: 0 or too many tasks, a queue that is empty, too long or
  has a character outside [A-Za-z0-9._:-], a payload, key or headers too long (measured in
  UTF-8 bytes, which is never less than the characters the validator counts), max_attempts
  over its limit, a fire time too far ahead or behind, a lease out of bounds.

Scalar fields that occur twice keep the last value, as protobuf does; so do header keys.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp

from taskwheel.core.protowire cimport (Out, put_bytes, put_timestamp, put_varint, reserve, timestamp_body_size,
                                      varint_size)
from taskwheel.core.records cimport RecordShape, untrack_container

from taskwheel.core.sharding import shards_of

cdef int64_t _SECONDS_MAX = 1_000_000_000_000_000  # far past any limit, far from overflowing ms
cdef int _WIRE_VARINT = 0
cdef int _WIRE_LEN = 2
# SubmitResponse.results = 1; SubmitResult's task_id = 1, duplicate = 4, fire_at = 5: tags.
cdef int _RESULTS = 1 << 3 | _WIRE_LEN
cdef int _TASK_ID = 1 << 3 | _WIRE_LEN
cdef int _DUPLICATE = 4 << 3 | _WIRE_VARINT
cdef int _FIRE_AT = 5 << 3 | _WIRE_LEN


cdef inline bint read_varint(Reader *r, uint64_t *out) noexcept:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef unsigned char b
    while r.p < r.end and shift < 64:
        b = r.p[0]
        r.p += 1
        value |= <uint64_t>(b & 0x7F) << shift
        if b < 0x80:
            out[0] = value
            return True
        shift += 7
    return False


cdef inline bint read_len(Reader *r, Reader *inner) noexcept:
    """A length-delimited field's bytes into ``inner``; False if it runs past the end."""
    cdef uint64_t n
    if not read_varint(r, &n) or n > <uint64_t>(r.end - r.p):
        return False
    inner.p = r.p
    inner.end = r.p + n
    r.p += n
    return True


cdef bint read_time(Reader *r, int64_t *seconds, int64_t *nanos) noexcept:
    """A google.protobuf.Timestamp or Duration: seconds = 1 (int64), nanos = 2 (int32)."""
    cdef uint64_t key, value
    seconds[0] = 0
    nanos[0] = 0
    while r.p < r.end:
        if not read_varint(r, &key) or key & 7 != _WIRE_VARINT or not read_varint(r, &value):
            return False
        if key >> 3 == 1:
            seconds[0] = <int64_t>value
        elif key >> 3 == 2:
            nanos[0] = <int32_t><uint32_t>value  # int32 keeps the low 32 bits, as protobuf does
        else:
            return False
    return -_SECONDS_MAX < seconds[0] < _SECONDS_MAX


cdef inline int64_t ms_rounded_up(int64_t nanos) noexcept:
    """Whole milliseconds of ``nanos`` (0 <= nanos < 1e9), rounded up: a time kept in
    milliseconds is never earlier than the one asked for, and a duration never shorter."""
    return (nanos + 999_999) // 1_000_000


cdef object utf8(Reader *r):
    """The field's bytes as str, or None when they are not UTF-8."""
    try:
        return PyUnicode_DecodeUTF8(<const char *>r.p, r.end - r.p, NULL)
    except UnicodeDecodeError:
        return None


cdef inline bint queue_char(unsigned char c) noexcept:
    return (b'a' <= c <= b'z' or b'A' <= c <= b'Z' or b'0' <= c <= b'9'
            or c == b'.' or c == b'_' or c == b':' or c == b'-')


cdef class _Limits:
    def __cinit__(self, limits):
        self.max_batch = limits.max_batch
        self.max_payload_bytes = limits.max_payload_bytes
        self.max_queue_len = limits.max_queue_len
        self.max_headers = limits.max_headers
        self.max_header_bytes = limits.max_header_bytes
        self.max_key_len = limits.max_idempotency_key_len
        self.max_attempts = limits.max_attempts
        self.default_max_attempts = limits.default_max_attempts
        self.max_future_ms = limits.max_future_ms
        self.max_past_ms = limits.max_past_ms
        self.default_lease_ms = limits.default_lease_ms
        self.min_lease_ms = limits.min_lease_ms
        self.max_lease_ms = limits.max_lease_ms


cdef class _Spec:
    """One task's values, read and checked, waiting for its id."""


cdef int read_headers_entry(Reader *r, dict headers, int64_t *size) except -1:
    """One map entry (key = 1, value = 2, both strings) into ``headers``; 0 if unusual."""
    cdef uint64_t tag
    cdef Reader field
    key = value = ""
    while r.p < r.end:
        if not read_varint(r, &tag) or tag & 7 != _WIRE_LEN or not read_len(r, &field):
            return False
        if tag >> 3 == 1:
            key = utf8(&field)
        elif tag >> 3 == 2:
            value = utf8(&field)
        else:
            return False
        if key is None or value is None:
            return False
        size[0] += field.end - field.p
    headers[key] = value
    return True


cdef _Spec read_spec(Reader *r, _Limits limits, int64_t now, list last_queue):
    """A TaskSpec's values if it is surely valid, else None (see the module's docstring)."""
    cdef uint64_t tag, number, value
    cdef Reader field, queue_bytes, payload_bytes
    cdef int64_t seconds = 0, nanos = 0, lease_seconds = 0, lease_nanos = 0
    cdef int when = 0
    cdef bint has_lease = False
    cdef int64_t header_bytes = 0, fire_at, delay_ms
    cdef uint32_t max_attempts = 0
    cdef Py_ssize_t i
    cdef _Spec spec = _Spec.__new__(_Spec)
    queue_bytes.p = queue_bytes.end = NULL
    payload_bytes.p = payload_bytes.end = NULL
    spec.key = ""
    headers = None
    while r.p < r.end:
        if not read_varint(r, &tag):
            return None
        number = tag >> 3
        if number == 6:
            if tag & 7 != _WIRE_VARINT or not read_varint(r, &value):
                return None
            max_attempts = <uint32_t>value
            continue
        if tag & 7 != _WIRE_LEN or not read_len(r, &field):
            return None
        if number == 1:
            queue_bytes = field
        elif number == 2:
            payload_bytes = field
        elif number == 3 or number == 4:
            if when or not read_time(&field, &seconds, &nanos):
                return None
            when = <int>number
        elif number == 5:
            spec.key = utf8(&field)
            if spec.key is None or field.end - field.p > limits.max_key_len:
                return None
        elif number == 7:
            if headers is None:
                headers = {}
            if not read_headers_entry(&field, headers, &header_bytes):
                return None
        elif number == 8:
            if has_lease or not read_time(&field, &lease_seconds, &lease_nanos):
                return None
            has_lease = True
        else:
            return None

    cdef Py_ssize_t queue_len = queue_bytes.end - queue_bytes.p
    if queue_len == 0 or queue_len > limits.max_queue_len:
        return None
    cached = <bytes>last_queue[0]
    if PyBytes_GET_SIZE(cached) == queue_len and memcmp(PyBytes_AS_STRING(cached), queue_bytes.p, queue_len) == 0:
        spec.queue = last_queue[1]
    else:
        for i in range(queue_len):
            if not queue_char(queue_bytes.p[i]):
                return None
        spec.queue = PyUnicode_DecodeUTF8(<const char *>queue_bytes.p, queue_len, NULL)
        last_queue[0] = PyBytes_FromStringAndSize(<const char *>queue_bytes.p, queue_len)
        last_queue[1] = spec.queue

    if payload_bytes.end - payload_bytes.p > limits.max_payload_bytes:
        return None
    spec.payload = PyBytes_FromStringAndSize(<const char *>payload_bytes.p, payload_bytes.end - payload_bytes.p)

    if when == 3:
        if nanos < 0 or nanos >= 1_000_000_000:
            return None
        fire_at = seconds * 1000 + ms_rounded_up(nanos)
        if fire_at > now + limits.max_future_ms or fire_at < now - limits.max_past_ms:
            return None
    elif when == 4:
        if nanos < 0:
            return None
        delay_ms = seconds * 1000 + ms_rounded_up(nanos)
        if delay_ms < 0 or delay_ms > limits.max_future_ms:
            return None
        fire_at = now + delay_ms
    else:
        fire_at = now
    spec.fire_at = fire_at

    spec.max_attempts = max_attempts if max_attempts else limits.default_max_attempts
    if spec.max_attempts > limits.max_attempts:
        return None
    if headers is None:
        spec.headers = {}
    elif len(headers) > limits.max_headers or header_bytes > limits.max_header_bytes:
        return None
    else:
        spec.headers = headers
    spec.lease_ms = limits.default_lease_ms
    if has_lease and (lease_seconds or lease_nanos):  # a zero lease is the default, as an absent one
        if lease_nanos < 0:
            return None
        spec.lease_ms = lease_seconds * 1000 + ms_rounded_up(lease_nanos)
        if not limits.min_lease_ms <= spec.lease_ms <= limits.max_lease_ms:
            return None
    return spec


# The fields read from each task of a Submit; every other field is the request's (``template``).
_SPEC_FIELDS = ("task_id", "shard", "queue", "payload", "fire_at_ms", "due_ms", "max_attempts", "headers",
                "idempotency_key", "lease_ms")
cdef enum:
    _F_TASK_ID, _F_SHARD, _F_QUEUE, _F_PAYLOAD, _F_FIRE_AT, _F_DUE, _F_MAX_ATTEMPTS, _F_HEADERS, _F_KEY, _F_LEASE
    _SPEC_FIELD_COUNT


def records_of_submit(bytes raw, ids, Py_ssize_t num_shards, int64_t now, limits, RecordShape shape not None,
                      template):
    """The records of a SubmitRequest's wire bytes, in order, all valid; or None (see the
    module's docstring). ``ids`` is ingest's TaskIds (``take(now, count)``), ``limits`` its
    Limits, ``shape`` the records' RecordShape (taskwheel.task.TASK_RECORD_SLOTS) and
    ``template`` a record holding what every task of the request shares (state, gen, attempt,
    created and updated at ``now``, the request's traceparent): each record is a copy of it
    with the task's own fields (``_SPEC_FIELDS``) set."""
    cdef Reader r, field
    cdef uint64_t tag
    cdef _Limits lim = _Limits(limits)
    cdef list specs = []
    cdef list last_queue = [b"", None]
    cdef _Spec spec
    r.p = <const unsigned char *>PyBytes_AS_STRING(raw)
    r.end = r.p + PyBytes_GET_SIZE(raw)
    while r.p < r.end:
        if not read_varint(&r, &tag) or tag != (1 << 3 | _WIRE_LEN) or not read_len(&r, &field):
            return None
        spec = read_spec(&field, lim, now, last_queue)
        if spec is None:
            return None
        specs.append(spec)
        if len(specs) > lim.max_batch:
            return None
    cdef Py_ssize_t i, n = len(specs)
    if n == 0:
        return None
    cdef Py_ssize_t at[_SPEC_FIELD_COUNT]
    shape.positions_of(_SPEC_FIELDS, at)
    task_ids = ids.take(now, n)
    shards = shards_of(task_ids, num_shards)
    cdef list records = []
    now_obj = now
    for i in range(n):
        spec = <_Spec>specs[i]
        record = shape.copy(template)
        shape.put(record, at[_F_TASK_ID], task_ids[i])
        shape.put(record, at[_F_SHARD], shards[i])
        shape.put(record, at[_F_QUEUE], spec.queue)
        shape.put(record, at[_F_PAYLOAD], spec.payload)
        shape.put(record, at[_F_FIRE_AT], spec.fire_at)
        shape.put(record, at[_F_DUE], spec.fire_at if spec.fire_at > now else now_obj)
        shape.put(record, at[_F_MAX_ATTEMPTS], spec.max_attempts)
        shape.put(record, at[_F_HEADERS], spec.headers)
        shape.put(record, at[_F_KEY], spec.key)
        shape.put(record, at[_F_LEASE], spec.lease_ms)
        records.append(record)
    untrack_container(records)
    return records


def encode_submit_results(list task_ids, list fire_ats, list duplicates):
    """A SubmitResponse's wire bytes, one SubmitResult per task in order: its task_id, and
    either duplicate = true or its fire_at (from unix ms, floored as wire.set_ms does), with
    default values left out as protobuf leaves them out."""
    cdef Out out
    cdef Py_ssize_t i, n = len(task_ids), id_len, body, stamp
    cdef const char *id_data
    cdef int64_t ms = 0
    cdef bint duplicate
    out.data = NULL
    out.size = out.capacity = 0
    try:
        for i in range(n):
            id_data = PyUnicode_AsUTF8AndSize(task_ids[i], &id_len)
            duplicate = duplicates[i]
            body = 1 + varint_size(<uint64_t>id_len) + id_len if id_len else 0
            if duplicate:
                body += 2
            else:
                ms = fire_ats[i]
                stamp = timestamp_body_size(ms)
                body += 1 + varint_size(<uint64_t>stamp) + stamp
            reserve(&out, 1 + varint_size(<uint64_t>body) + body)
            put_varint(&out, _RESULTS)
            put_varint(&out, <uint64_t>body)
            if id_len:
                put_varint(&out, _TASK_ID)
                put_varint(&out, <uint64_t>id_len)
                put_bytes(&out, id_data, id_len)
            if duplicate:
                put_varint(&out, _DUPLICATE)
                put_varint(&out, 1)
            else:
                put_timestamp(&out, _FIRE_AT, ms)
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        PyMem_Free(out.data)
