# cython: language_level=3
"""C-level declarations of leases.pyx: a fired task's fields."""
from libc.stdint cimport int64_t


cdef class Fired:
    cdef public object record  # waiting: the row to deliver; sent: the delivered row (gen - 1)
    cdef public list batches  # push batches it confirms once its first write is durable
    cdef public int64_t since  # waiting since (ms)
    cdef public int64_t fired_at  # when the timer fired it (ms)
    cdef public int64_t held_gen  # the gen of its hold row, once written; 0: none
    cdef public bint written  # sent: the LEASE (or a final transition in its place) is queued
    cdef public int64_t gen  # sent: the lease row's gen
    cdef public int64_t due_ms  # sent: the lease row's due time, the lease's expiry
    cdef public object consumer  # sent: the consumer it went to
    cdef public object delivery_id  # sent: "{task_id}.{gen}"
