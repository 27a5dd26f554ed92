# cython: language_level=3
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""The timer's pending tasks: a TimingWheel of integer keys, the record each key stands for,
and each task's key.

The wheel orders integers; the timer holds task records. Each record admitted takes a key, the
index of a free cell in a C array of record pointers (a task keeps its key while it is held,
so a newer gen of it moves in the wheel instead of firing twice; a fired or forgotten task's
cell is reused), the wheel gets (key, due_ms), and a dict maps each task_id to its key, to
forget a task by name and to find it again when a newer gen comes: a dict split 64 ways
(core/idshards.pxd), since one dict of a million pending ids, churned at 50K/s, would be
rebuilt whole inside one admit every few hundred thousand inserts.

Why compiled, and why cells: at 50K fires/s the timer admits a slice of 50,000 records a
second and fires as many, in due order, which is random against the order the records were
built. Kept in the timer's Python as two dicts (key -> record, task_id -> key), that was a
sixth of the event loop's time, over a microsecond a record to admit and to fire, mostly
cache misses: the dict entry, the int key object it holds, the record, its
task_id string, the other dict's entry, one after the other for each record. A cell is found
without a miss of its own, and ``fire`` works in passes over the fired batch, prefetching what
the next pass reads (records, then their task ids), so the misses of a batch overlap instead
of following each other.

Rules (the reference model, taskwheel.timer.reference.ReferencePendingTasks, states them in
Python, and the same tests run against both):
* ``admit(records, skip)`` schedules each record at its ``due_ms`` unless its ``task_id`` is
  in ``skip``, or the task is held at the same or a newer ``gen`` already; it returns the
  earliest due_ms it scheduled, or None.
* ``fire(now_ms)`` returns the records of every key due by then, in deadline order (the
  wheel's ``advance``), and forgets them.
* ``forget(task_ids)`` takes the named tasks out; unknown names are ignored; returns how many.

``record``, a core.RecordShape of the records' type (TaskRecord), has their fields read from
their slots instead of by getattr (see records.pxd's read_field).

The wheel is shared for reading (``len``, ``next_deadline``); a key scheduled or cancelled in
it directly would break the correspondence. Threading: one thread (the event loop's), like
the wheel.
"""
from cpython cimport array
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc, realloc

from taskwheel.core.idshards cimport id_shard, id_shards
from taskwheel.core.records cimport PyObject_GC_IsTracked, RecordShape, read_field, untrack_container
from taskwheel.core.wheel cimport TimingWheel

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
      #define PT_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #else
      #define PT_PREFETCH(p) ((void)0)
    #endif
    """
    void PT_PREFETCH(const void *p) noexcept nogil

cdef array.array _INT64S = array.array("q")


cdef class PendingTasks:
    """Task records in a TimingWheel, by key and by task id (see the module's docstring)."""

    def __cinit__(self, TimingWheel wheel not None, RecordShape record=None):
        if len(wheel):
            raise ValueError("the wheel must be empty: keys already in it would have no record")
        self.wheel = wheel
        self._keys = id_shards()
        self._record = record
        self._kind = NULL if record is None else record.offsets_of(("task_id", "gen", "due_ms"), self._at)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._cells != NULL:
            for i in range(self._cells_used):
                Py_XDECREF(self._cells[i])
            free(self._cells)
        free(self._free)

    cdef int64_t _take_cell(self, object rec) except -1:
        cdef int64_t key
        cdef Py_ssize_t cap
        cdef int64_t *freed
        cdef PyObject **grown
        if self._free_count:
            self._free_count -= 1
            key = self._free[self._free_count]
        else:
            if self._cells_used == self._cells_cap:
                cap = max(1024, self._cells_cap * 2)
                # The free list first: it may be larger than the cells, never smaller.
                freed = <int64_t *>realloc(self._free, cap * sizeof(int64_t))
                if freed == NULL:
                    raise MemoryError()
                self._free = freed
                grown = <PyObject **>realloc(self._cells, cap * sizeof(PyObject *))
                if grown == NULL:
                    raise MemoryError()
                self._cells, self._cells_cap = grown, cap
            key = self._cells_used
            self._cells_used += 1
        Py_INCREF(rec)
        self._cells[key] = <PyObject *>rec
        self._count += 1
        return key

    cdef inline void _release_cell(self, int64_t key) noexcept:
        """Empties a cell, dropping its reference (the caller holds one if it keeps the record)."""
        cdef PyObject *rec = self._cells[key]
        self._cells[key] = NULL
        self._free[self._free_count] = key
        self._free_count += 1
        self._count -= 1
        Py_XDECREF(rec)

    def admit(self, records, skip=None):
        """Schedules records (see the module's docstring); the earliest due_ms scheduled, or None."""
        cdef Py_ssize_t n = len(records), count = 0
        cdef array.array keys = array.clone(_INT64S, n, False)
        cdef array.array deadlines = array.clone(_INT64S, n, False)
        cdef int64_t key, due, earliest = 0
        cdef PyObject *found
        cdef bint skipping = bool(skip)
        cdef dict by_task
        cdef object held
        for rec in records:
            task_id = read_field(rec, self._kind, self._at[0], "task_id")
            if skipping and task_id in skip:
                continue
            by_task = id_shard(self._keys, task_id)
            found = PyDict_GetItem(by_task, task_id)
            if found != NULL:
                key = <object>found
                held = <object>self._cells[key]
                if (read_field(held, self._kind, self._at[1], "gen")
                        >= read_field(rec, self._kind, self._at[1], "gen")):
                    continue
                Py_INCREF(rec)
                self._cells[key] = <PyObject *>rec
                Py_XDECREF(<PyObject *>held)
            else:
                key = self._take_cell(rec)
                by_task[task_id] = key
            due = read_field(rec, self._kind, self._at[2], "due_ms")
            if count == 0 or due < earliest:
                earliest = due
            keys.data.as_longlongs[count] = key
            deadlines.data.as_longlongs[count] = due
            count += 1
        if count == 0:
            return None
        array.resize(keys, count)
        array.resize(deadlines, count)
        self.wheel.schedule_many(keys, deadlines)
        return earliest

    def fire(self, now_ms):
        """The records due by ``now_ms``, in deadline order, no longer held."""
        cdef array.array keys = self.wheel.advance(now_ms)
        cdef Py_ssize_t i, n = len(keys)
        cdef long long *k = keys.data.as_longlongs
        cdef list fired = PyList_New(n)
        cdef list ids = PyList_New(n)
        cdef list by_task = self._keys
        cdef PyObject *rec
        cdef bint tracked = False
        # Pass 1, the records: in cells, fetched ahead of the pass that reads them.
        for i in range(n):
            PT_PREFETCH(self._cells[k[i]])
        # Pass 2, their task ids, each fetched ahead of the dict lookup that hashes it.
        for i in range(n):
            rec = self._cells[k[i]]
            Py_INCREF(<object>rec)
            PyList_SET_ITEM(fired, i, <object>rec)  # steals the reference just taken
            tracked = tracked or PyObject_GC_IsTracked(<object>rec)
            task_id = read_field(<object>rec, self._kind, self._at[0], "task_id")
            PT_PREFETCH(<PyObject *>task_id)
            Py_INCREF(task_id)
            PyList_SET_ITEM(ids, i, task_id)
        # Pass 3: out of the dict and the cells.
        for i in range(n):
            task_id = ids[i]
            del id_shard(by_task, task_id)[task_id]
            self._release_cell(k[i])
        if not tracked:
            untrack_container(fired)  # held until dispatch confirms the batch (untrack_list)
        return fired

    def forget(self, task_ids):
        """Takes the named tasks out of the wheel; returns how many were held."""
        cdef array.array keys = array.clone(_INT64S, 0, False)
        cdef dict by_task
        cdef PyObject *found
        cdef int64_t key
        for task_id in task_ids:
            by_task = id_shard(self._keys, task_id)
            found = PyDict_GetItem(by_task, task_id)
            if found == NULL:
                continue
            key = <object>found
            del by_task[task_id]
            self._release_cell(key)
            array.resize_smart(keys, len(keys) + 1)
            keys.data.as_longlongs[len(keys) - 1] = key
        if len(keys):
            self.wheel.cancel_many(keys)
        return len(keys)

    def get(self, task_id):
        """The record held for ``task_id``, or None."""
        found = id_shard(self._keys, task_id).get(task_id)
        return None if found is None else <object>self._cells[<int64_t>found]

    def records(self):
        """Every record held, in no particular order."""
        cdef Py_ssize_t i
        return [<object>self._cells[i] for i in range(self._cells_used) if self._cells[i] != NULL]

    def __len__(self):
        return self._count

    def __contains__(self, task_id):
        return task_id in id_shard(self._keys, task_id)
