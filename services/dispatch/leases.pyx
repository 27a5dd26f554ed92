# cython: language_level=3
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""Dispatch's fired tasks, from the timer's fire to the worker's ack: its tables of them
(``DispatchState``), the three loops that run once per task over those tables, and the object
each task is while it waits for a worker and then while its delivery is out.

A fired task is one ``Fired``: waiting for a worker (``record`` is the row to deliver), then,
once sent, its delivery's lease (``record`` is the delivered row, ``gen`` the lease row's gen,
``due_ms`` the lease's expiry). One object for both roles, so a task sent at once costs one
allocation, not two.

* ``DispatchState.take_fired`` takes the timer's fired records: a task acked in the race with
  its firing is counted done, a task new to dispatch becomes a Fired waiting in its queue's
  ``ready``, and anything else (a redelivery, a reloaded copy, a queue not seen before) goes
  to the caller's ``slow`` callback, at its place in the order.
* ``DispatchState.fill`` sends a consumer as many ready tasks as it has room for: each becomes
  a lease under its delivery id ``"{task_id}.{gen}"``.
* ``DispatchState.settle_acks`` answers the leases a worker acked: a SUCCEED transition for
  each, built from C (``RecordShape``), superseding the lease row once written, else the
  delivered row, whose lease is then never written.
* ``FinishedGeneration`` is one generation of dispatch's memory of finished tasks
  (taskwheel.dispatch.finished keeps several by time): a split dict with a Bloom filter in
  front. Every fired task is looked up in every generation, and a task never finished, nearly
  all of them, misses in each one's dict, a cache miss apiece in dicts of 100,000s of
  entries; the filter answers most of those misses from one word of a small array. It has no
  false negatives (every key put is marked), so a finished task is never delivered again.

Why compiled: these loops run once per task at tens of thousands of tasks a second, and as
Python their attribute loads and stores of slotted objects, the f-string of each delivery id
and a dataclass ``__init__`` per acked task were the largest share of the event loop's work.
Here the Fired's fields are C fields and a transition's slots are filled directly; the dicts
and deques are still CPython's, and each lookup costs what it costs.

Rules: the reference model, taskwheel.dispatch.reference, states them in Python, and the same
tests run against both.

A Fired is not tracked by the cyclic GC (``no_gc``): 10,000s are alive at once under load, and
each young collection would walk them all. Its one cycle, lease -> consumer -> in_flight ->
lease, is broken by dispatch when the lease is answered or the worker goes (it empties the
consumer's ``in_flight``). Threading: one thread (the event loop's).
"""
cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject, PyObject_Hash
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free

from taskwheel.core.idshards cimport ID_SHARDS, id_shard_of_hash, id_shards, id_shards_len
from taskwheel.core.records cimport RecordShape, read_field, untrack_container

# Where the finished memory keeps the gen in its ints: gen << 44 | finished at (ms); wall-clock
# milliseconds fit in 44 bits until the year 2527. A gen below 2 ** 19 makes the int in C.
cdef enum:
    _MS_BITS = 44
    _C_GEN_LIMIT = 1 << 19

# A SUCCEED transition's fields, in RecordShape order: taskwheel.stores.base.Transition.
_TRANSITION_FIELDS = ("task_id", "shard", "kind", "expected_gen", "old_due_ms", "due_ms", "attempt",
                      "error", "task")
cdef object _ZERO = 0
cdef object _NO_ERROR = ""


# The record fields the loops below read: from their slots (at these indices of the offsets
# the ``record`` shape a caller passes gives) when a record is of its type, else by getattr.
cdef enum:
    _TASK_ID, _GEN, _QUEUE, _LEASE_MS, _SHARD, _DUE_MS
_RECORD_FIELDS = ("task_id", "gen", "queue", "lease_ms", "shard", "due_ms")


cdef inline PyObject *_slots(RecordShape record, Py_ssize_t *at) except? NULL:
    """``record``'s type, with the offsets of _RECORD_FIELDS in ``at``; NULL for no shape."""
    return NULL if record is None else record.offsets_of(_RECORD_FIELDS, at)


@cython.final
@cython.no_gc
cdef class Fired:
    """A fired task: waiting for a worker, then, once sent, its delivery's lease."""

    def __init__(self, record, list batches, int64_t since, int64_t fired_at):
        self.record = record
        self.batches = batches
        self.since = since
        self.fired_at = fired_at

    def __repr__(self):
        return (f"Fired({self.record.task_id!r}, gen={self.gen}, delivery_id={self.delivery_id!r}, "
                f"written={self.written}, held_gen={self.held_gen})")


cdef inline uint64_t _pattern(Py_hash_t h) noexcept:
    # Three bits of one word, from hash bits above those that pick the word.
    cdef uint64_t u = <uint64_t>h
    return ((<uint64_t>1) << ((u >> 32) & 63)) | ((<uint64_t>1) << ((u >> 40) & 63)) | \
        ((<uint64_t>1) << ((u >> 48) & 63))


@cython.final
cdef class FinishedGeneration:
    """One generation of finished tasks: task_id -> gen << 44 | finished at (ms), a dict
    split 64 ways (core/idshards.pxd: one dict of 350K finished tasks was rebuilt inside an
    ack, 27 ms) with a Bloom filter in front, sized for ``capacity`` keys at 8 bits a key
    (~5 % false positives there; more keys only raise that rate). Keys are only added and
    taken out by ``drain`` (to empty a dropped generation): a key taken out stays in the
    filter, which costs a dict lookup, never a wrong answer."""

    def __cinit__(self, Py_ssize_t capacity=65536):
        cdef Py_ssize_t words = 1024
        while words * 8 < capacity:
            words *= 2
        self._bits = <uint64_t *>calloc(words, sizeof(uint64_t))
        if self._bits == NULL:
            raise MemoryError()
        self._mask = words - 1
        self._shards = id_shards()

    def __dealloc__(self):
        free(self._bits)

    cdef inline bint _may_contain(self, Py_hash_t h) noexcept:
        cdef uint64_t pattern = _pattern(h)
        return (self._bits[<uint64_t>h & <uint64_t>self._mask] & pattern) == pattern

    cdef inline void _mark(self, Py_hash_t h) noexcept:
        self._bits[<uint64_t>h & <uint64_t>self._mask] |= _pattern(h)

    cdef int put(self, object task_id, object value) except -1:
        cdef Py_hash_t h = PyObject_Hash(task_id)
        self._mark(h)
        PyDict_SetItem(id_shard_of_hash(self._shards, h), task_id, value)
        return 0

    cdef object lookup(self, object task_id):
        """The entry of ``task_id``, or None."""
        cdef PyObject *hit
        cdef Py_hash_t h = PyObject_Hash(task_id)
        if not self._may_contain(h):
            return None
        hit = PyDict_GetItem(id_shard_of_hash(self._shards, h), task_id)
        return None if hit == NULL else <object>hit

    def may_hold(self, task_id):
        """False when ``task_id`` was surely never put; True when the dict must be asked."""
        return self._may_contain(PyObject_Hash(task_id))

    @property
    def bytes(self):
        """The filter's size."""
        return (self._mask + 1) * sizeof(uint64_t)

    @property
    def entries(self):
        """Every entry, as one new dict (to inspect; the hot paths never build it)."""
        merged = {}
        for d in self._shards:
            merged.update(<dict>d)
        return merged

    def __setitem__(self, task_id, value):
        self.put(task_id, value)

    def __getitem__(self, task_id):
        value = self.lookup(task_id)
        if value is None:
            raise KeyError(task_id)
        return value

    def get(self, task_id, default=None):
        value = self.lookup(task_id)
        return default if value is None else value

    def __contains__(self, task_id):
        return self.lookup(task_id) is not None

    def __len__(self):
        return id_shards_len(self._shards)

    def __iter__(self):
        for d in self._shards:
            yield from <dict>d

    def drain(self, Py_ssize_t most):
        """Takes out up to ``most`` entries, a piece at a time (a piece that fits is cleared
        whole, which frees its table at once); returns how many it took out."""
        cdef Py_ssize_t taken = 0, size
        cdef dict d
        while taken < most and self._drained < ID_SHARDS:
            d = <dict>self._shards[self._drained]
            size = len(d)
            if size <= most - taken:
                d.clear()
                taken += size
                self._drained += 1
            else:
                for _ in range(most - taken):
                    d.popitem()
                taken = most
        return taken

    def update(self, pairs):
        """Puts each (task_id, value) of ``pairs``."""
        for task_id, value in pairs:
            self.put(task_id, value)


cdef inline object _finished_entry(list finished, object task_id):
    """The newest generation's entry of ``task_id`` in the finished memory, or None."""
    cdef object value
    for generation in finished:
        value = (<FinishedGeneration?>generation).lookup(task_id)
        if value is not None:
            return value
    return None


cdef inline object _finished_value(int64_t gen, int64_t now):
    if 0 <= gen < _C_GEN_LIMIT:
        return (gen << _MS_BITS) | now
    return (<object>gen << _MS_BITS) | now



@cython.final
cdef class Take:
    """One take of fired tasks: the push ``batch`` they confirm, when they were taken (``now``)
    and fired (``fired_at``); what take_fired leaves for the caller: the ids of the tasks now
    waiting (``unheld``), and the queue states that got tasks (``touched``)."""

    def __init__(self, object batch, int64_t now, int64_t fired_at):
        self.batch = batch
        self.now = now
        self.fired_at = fired_at
        self.unheld = []
        self.touched = set()
        self.batches = None


@cython.final
cdef class DispatchState:
    """Dispatch's tables of fired tasks, and the three loops that run once per task over them.

    ``queues``: queue name -> its state, whose ``ready`` deque holds the Fired waiting for a
    worker in order; ``waiting``: task_id -> that Fired; ``leases``: task_id -> the Fired sent,
    its delivery's lease; ``finished``: the finished memory's generations (FinishedGeneration),
    newest first, one list the memory changes in place. ``record``, a RecordShape of the
    records' type, has their fields read from their slots (None: by getattr); ``transition``,
    a RecordShape of taskwheel.stores.base.Transition, builds the acks' transitions, of kind
    ``succeed``."""

    def __init__(self, list finished, RecordShape transition not None, object succeed, RecordShape record=None):
        if transition.count != len(_TRANSITION_FIELDS) or transition.fields != _TRANSITION_FIELDS:
            raise TypeError(f"transition must be a RecordShape of the fields {_TRANSITION_FIELDS}")
        self.queues = {}
        self.waiting = {}
        self.leases = {}
        self.finished = finished
        self.record = record
        self.transition = transition
        self.succeed = succeed

    def take_fired(self, list records, Take take not None, object slow):
        """Takes fired ``records`` (each with task_id, gen, queue) for ``take``.

        A record whose task finished at its gen or later is counted done
        (``take.batch.done_one()``). A task in neither ``leases`` nor ``waiting`` whose queue
        is in ``queues`` becomes a Fired(record, [batch], now, fired_at) in ``waiting`` and at
        the end of its queue state's ``ready``; its task_id goes to ``take.unheld``, the queue
        state to ``take.touched``. The Fired of one take share one list ``[batch]``, never
        changed in place (a task given another batch gets a new list). Any other record is
        passed to ``slow(take, record)``, at its place in the order. Returns how many were new."""
        cdef Py_ssize_t i, n = PyList_GET_SIZE(records), taken = 0
        cdef object rec, task_id, fin, queue, last_queue = None, qs = None, ready = None
        cdef object batch = take.batch
        cdef list finished = self.finished, unheld = take.unheld
        cdef dict leases = self.leases, waiting = self.waiting, queues = self.queues
        cdef set touched = take.touched
        cdef PyObject *hit
        cdef Fired f
        cdef Py_ssize_t at[6]
        cdef PyObject *kind = _slots(self.record, at)
        for i in range(n):
            rec = records[i]
            task_id = read_field(rec, kind, at[_TASK_ID], "task_id")
            if finished:
                fin = _finished_entry(finished, task_id)
                if fin is not None and fin >> _MS_BITS >= read_field(rec, kind, at[_GEN], "gen"):
                    batch.done_one()  # the lease row of a task acked in the race with its firing
                    continue
            if PyDict_GetItem(leases, task_id) != NULL or PyDict_GetItem(waiting, task_id) != NULL:
                slow(take, rec)
                continue
            queue = read_field(rec, kind, at[_QUEUE], "queue")
            if ready is None or (queue is not last_queue and queue != last_queue):
                hit = PyDict_GetItem(queues, queue)
                if hit == NULL:
                    ready = None
                    slow(take, rec)
                    continue
                qs = <object>hit
                ready = qs.ready
                last_queue = queue
                touched.add(qs)
            if take.batches is None:
                take.batches = [batch]
            f = Fired.__new__(Fired)
            f.record = rec
            f.batches = take.batches
            f.since = take.now
            f.fired_at = take.fired_at
            PyDict_SetItem(waiting, task_id, f)
            unheld.append(task_id)
            ready.append(f)
            taken += 1
        return taken

    def fill(self, object qs, object consumer, Py_ssize_t room, int64_t now, int64_t shortest_lease_ms):
        """Sends ``consumer`` up to ``room`` tasks from the front of ``qs.ready`` (a deque of
        Fired).

        A Fired no longer the one ``waiting`` holds for its task (cancelled or superseded while
        it waited) is dropped. Each sent one leaves ``waiting`` and becomes a lease: gen = its
        record's gen + 1, delivery_id ``"{task_id}.{gen}"``, due_ms = ``now`` + the record's
        lease_ms, in ``consumer.in_flight`` under its delivery id and in ``leases`` under its
        task id. Returns (the sent Fired in order, the shortest of their lease_ms and
        ``shortest_lease_ms``)."""
        cdef list sent = []
        untrack_container(sent)  # of Fired only, which the GC does not track (untrack_list)
        cdef object ready = qs.ready
        cdef dict in_flight = consumer.in_flight, waiting = self.waiting, leases = self.leases
        cdef Fired f
        cdef object rec, task_id, delivery_id
        cdef PyObject *hit
        cdef int64_t gen, lease_ms
        cdef Py_ssize_t at[6]
        cdef PyObject *kind = _slots(self.record, at)
        while room > 0 and ready:
            f = <Fired?>ready.popleft()
            rec = f.record
            task_id = read_field(rec, kind, at[_TASK_ID], "task_id")
            hit = PyDict_GetItem(waiting, task_id)
            if hit != <PyObject *>f:
                continue
            PyDict_DelItem(waiting, task_id)
            room -= 1
            gen = read_field(rec, kind, at[_GEN], "gen") + 1
            delivery_id = f"{task_id}.{gen}"
            lease_ms = read_field(rec, kind, at[_LEASE_MS], "lease_ms")
            f.gen = gen
            f.consumer = consumer
            f.delivery_id = delivery_id
            f.due_ms = now + lease_ms
            if lease_ms < shortest_lease_ms:
                shortest_lease_ms = lease_ms
            PyDict_SetItem(in_flight, delivery_id, f)
            PyDict_SetItem(leases, task_id, f)
            sent.append(f)
        return sent, shortest_lease_ms

    def settle_acks(self, object consumer, delivery_ids, FinishedGeneration finished not None, int64_t now,
                    object elsewhere, list traced=None):
        """Answers the ``delivery_ids`` ``consumer`` acked: each one's lease is taken from its
        ``in_flight`` or, not there, from ``elsewhere(delivery_id)`` (None: a stale ack,
        skipped), and leaves ``leases``.

        For each, ``finished[task_id] = gen << 44 | now`` (the finished memory's newest
        generation) and a ``succeed`` transition is built: of the lease row (gen, due_ms) once
        written, else of the delivered row, the lease then marked written so it never is.
        ``traced``, when given, gets each lease answered. Returns (transitions, push batch
        lists to confirm once they are durable, task ids the timer may hold a row of (the lease
        row, or a hold row), how many were settled before their lease was written)."""
        cdef RecordShape transition = self.transition
        cdef dict in_flight = consumer.in_flight, leases = self.leases
        cdef object succeed = self.succeed
        cdef list transitions = [], confirm = [], forget = []
        untrack_container(transitions)  # RecordShape instances (see untrack_list)
        untrack_container(forget)  # task ids
        cdef Py_ssize_t coalesced = 0
        cdef Fired f
        cdef object lease, rec, task_id, t, done = None
        cdef int64_t done_gen = -1
        cdef PyObject *hit
        cdef Py_ssize_t at[6]
        cdef PyObject *kind = _slots(self.record, at)
        for delivery_id in delivery_ids:
            hit = PyDict_GetItem(in_flight, delivery_id)
            if hit != NULL:
                lease = <object>hit
                PyDict_DelItem(in_flight, delivery_id)
            else:
                lease = elsewhere(delivery_id)
                if lease is None:
                    continue
            f = <Fired?>lease
            rec = f.record
            task_id = read_field(rec, kind, at[_TASK_ID], "task_id")
            if PyDict_GetItem(leases, task_id) == <PyObject *>f:
                PyDict_DelItem(leases, task_id)
            if f.gen != done_gen:  # one int for the many acks of one gen: fewer objects to free
                done_gen = f.gen
                done = _finished_value(done_gen, now)
            finished.put(task_id, done)
            t = transition.new_instance()
            transition.put(t, 0, task_id)
            transition.put(t, 1, read_field(rec, kind, at[_SHARD], "shard"))
            transition.put(t, 2, succeed)
            if f.written:
                transition.put(t, 3, f.gen)
                transition.put(t, 4, f.due_ms)
                forget.append(task_id)
            else:
                # Answered before its lease was written: the delivered row ends, with one write.
                f.written = True
                coalesced += 1
                transition.put(t, 3, read_field(rec, kind, at[_GEN], "gen"))
                transition.put(t, 4, read_field(rec, kind, at[_DUE_MS], "due_ms"))
                confirm.append(f.batches)
                if f.held_gen:
                    forget.append(task_id)
            transition.put(t, 5, _ZERO)
            transition.put(t, 6, _ZERO)
            transition.put(t, 7, _NO_ERROR)
            transition.put(t, 8, None)
            transitions.append(t)
            if traced is not None:
                traced.append(f)
        return transitions, confirm, forget, coalesced
