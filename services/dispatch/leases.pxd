# cython: language_level=3
"""C-level declarations of leases.pyx: a fired task's fields."""
from libc.stdint cimport int64_t, uint64_t

from taskwheel.core.records cimport RecordShape


cdef class Fired:
    cdef public object record  # waiting: the row to deliver; sent: the delivered row (gen - 1)
    cdef public list batches  # push batches it confirms once its first write is durable; shared, never changed in place
    cdef public int64_t since  # waiting since (ms)
    cdef public int64_t fired_at  # when the timer fired it (ms)
    cdef public int64_t held_gen  # the gen of its hold row, once written; 0: none
    cdef public bint written  # sent: the LEASE (or a final transition in its place) is queued
    cdef public int64_t gen  # sent: the lease row's gen
    cdef public int64_t due_ms  # sent: the lease row's due time, the lease's expiry
    cdef public object consumer  # sent: the consumer it went to
    cdef public object delivery_id  # sent: "{task_id}.{gen}"


cdef class FinishedGeneration:
    cdef list _shards  # task_id -> gen << 44 | finished at (ms): a split dict (idshards.pxd)
    cdef Py_ssize_t _drained  # pieces emptied by drain, from the first
    cdef uint64_t *_bits  # a blocked Bloom filter of the entries' hashes: three bits in one word
    cdef Py_ssize_t _mask  # words - 1 (a power of two)

    cdef inline bint _may_contain(self, Py_hash_t h) noexcept
    cdef inline void _mark(self, Py_hash_t h) noexcept
    cdef int put(self, object task_id, object value) except -1
    cdef object lookup(self, object task_id)


cdef class Take:
    cdef readonly object batch  # the push batch the taken tasks confirm
    cdef readonly int64_t now, fired_at
    cdef readonly list unheld  # ids of the tasks the take left waiting
    cdef readonly set touched  # queue states that got tasks
    cdef list batches  # [batch], shared by the take's Fired once the first is made


cdef class DispatchState:
    cdef readonly dict queues  # queue name -> its state (``ready``: a deque of Fired)
    cdef readonly dict waiting  # task_id -> Fired waiting for a worker
    cdef readonly dict leases  # task_id -> Fired sent: its delivery's lease
    cdef readonly list finished  # the finished memory's generations, newest first
    cdef readonly RecordShape record  # the records' shape, or None
    cdef readonly RecordShape transition  # Transition's shape, for the acks' transitions
    cdef readonly object succeed  # TransitionKind.SUCCEED
