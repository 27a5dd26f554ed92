# cython: language_level=3
"""C-level declarations of submits.pyx: the reader over a message's bytes, and a task's
values between reading them and building its record."""
from libc.stdint cimport int64_t


cdef struct Reader:
    const unsigned char *p
    const unsigned char *end


cdef class _Limits:
    """Ingest's Limits, read once per request into C integers."""
    cdef int64_t max_batch, max_payload_bytes, max_queue_len, max_headers, max_header_bytes
    cdef int64_t max_key_len, max_attempts, default_max_attempts, max_future_ms, max_past_ms
    cdef int64_t default_lease_ms, min_lease_ms, max_lease_ms


cdef class _Spec:
    cdef object queue, payload, headers, key
    cdef int64_t fire_at, max_attempts, lease_ms
