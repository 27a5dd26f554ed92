"""Plain-Python models of the compiled core, used only as test oracles.

They favour being obviously correct over being fast: ReferenceWheel keeps every pending key
in a dict and a heap of (deadline, schedule number, key); ReferenceBatcher keeps a dict of
lists; ReferencePendingTasks keeps the timer's two dicts as the timer once did;
ReferenceSqliteReader is Python's sqlite3 with fetchall; ReferenceRecordShape builds an
instance with object.__new__ and setattr (it cannot take it out of the GC's view, which the
compiled one does); ReferenceFired with take_fired, fill and settle_acks are dispatch's loops
as they were in its servicer. The tests run the same behaviours against these and the
compiled classes.
"""
from __future__ import annotations

import heapq
import operator
import os
import sqlite3
import time
import urllib.parse
from array import array
from collections import deque
from typing import Any, Hashable, Iterable

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def _int64(value: object, name: str) -> int:
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise OverflowError(f"{name} {value} does not fit in int64")
    return int(value)


def _int64s(values: object, name: str) -> list[int]:
    if isinstance(values, (list, tuple)):
        return array("q", values).tolist()  # TypeError / OverflowError like the compiled wheel
    try:
        view = memoryview(values)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int64 buffer or a list of ints, "
                        f"not {type(values).__name__}") from None
    if view.ndim != 1 or view.itemsize != 8 or view.format.lstrip("@=<") not in ("q", "l"):
        raise TypeError(f"{name} must be a one-dimensional int64 buffer, not format {view.format!r}")
    return view.tolist()


class ReferenceWheel:
    """Same behaviour as taskwheel.core.TimingWheel, in the simplest possible way."""

    def __init__(self, tick_ms: int = 1, start_ms: int | None = None) -> None:
        tick_ms = _int64(tick_ms, "tick_ms")
        if tick_ms <= 0:
            raise ValueError(f"tick_ms must be positive, got {tick_ms}")
        if start_ms is None:
            start_ms = time.time_ns() // 1_000_000
        self.tick_ms = tick_ms
        self._now = _int64(start_ms, "start_ms")
        self._pending: dict[int, tuple[int, int]] = {}  # key -> (deadline, schedule number)
        self._heap: list[tuple[int, int, int]] = []  # may hold cancelled and moved entries
        self._scheduled = 0

    @property
    def now_ms(self) -> int:
        return self._now

    def schedule(self, key: int, deadline_ms: int) -> None:
        key = _int64(key, "key")
        deadline_ms = _int64(deadline_ms, "deadline_ms")
        self._scheduled += 1
        self._pending[key] = (deadline_ms, self._scheduled)
        heapq.heappush(self._heap, (deadline_ms, self._scheduled, key))

    def schedule_many(self, keys: Any, deadlines: Any) -> None:
        ks = _int64s(keys, "keys")
        ds = _int64s(deadlines, "deadlines")
        if len(ks) != len(ds):
            raise ValueError(f"keys and deadlines differ in length: {len(ks)} != {len(ds)}")
        for key, deadline in zip(ks, ds):
            self.schedule(key, deadline)

    def cancel(self, key: int) -> bool:
        return self._pending.pop(_int64(key, "key"), None) is not None

    def cancel_many(self, keys: Any) -> int:
        return sum(self.cancel(key) for key in _int64s(keys, "keys"))

    def advance(self, now_ms: int) -> array[int]:
        now_ms = _int64(now_ms, "now_ms")
        fired = []
        while self._heap and self._heap[0][0] <= now_ms:
            deadline, number, key = heapq.heappop(self._heap)
            if self._pending.get(key) == (deadline, number):
                del self._pending[key]
                fired.append(key)
        self._now = max(self._now, now_ms)
        return array("q", fired)

    def next_deadline(self) -> int | None:
        return min((deadline for deadline, _ in self._pending.values()), default=None)

    def deadline_of(self, key: int) -> int | None:
        entry = self._pending.get(_int64(key, "key"))
        return None if entry is None else entry[0]

    def __contains__(self, key: object) -> bool:
        try:
            return operator.index(key) in self._pending  # type: ignore[arg-type]
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._pending)


class ReferencePendingTasks:
    """PendingTasks in Python: the timer's bookkeeping as it was before it was compiled."""

    def __init__(self, wheel: Any) -> None:
        if len(wheel):
            raise ValueError("the wheel must be empty: keys already in it would have no record")
        self.wheel = wheel
        self._records: dict[int, Any] = {}
        self._keys: dict[str, int] = {}
        self._next_key = 1

    def admit(self, records: Iterable[Any], skip: Any = None) -> int | None:
        keys: list[int] = []
        deadlines: list[int] = []
        for rec in records:
            if skip and rec.task_id in skip:
                continue
            key = self._keys.get(rec.task_id)
            if key is not None:
                if self._records[key].gen >= rec.gen:
                    continue
            else:
                key = self._next_key
                self._next_key += 1
                self._keys[rec.task_id] = key
            self._records[key] = rec
            keys.append(key)
            deadlines.append(rec.due_ms)
        if not keys:
            return None
        self.wheel.schedule_many(keys, deadlines)
        return min(deadlines)

    def fire(self, now_ms: int) -> list[Any]:
        fired = [self._records.pop(key) for key in self.wheel.advance(now_ms)]
        for rec in fired:
            del self._keys[rec.task_id]
        return fired

    def forget(self, task_ids: Iterable[str]) -> int:
        keys = []
        for task_id in task_ids:
            key = self._keys.pop(task_id, None)
            if key is not None:
                del self._records[key]
                keys.append(key)
        if keys:
            self.wheel.cancel_many(keys)
        return len(keys)

    def get(self, task_id: str) -> Any:
        key = self._keys.get(task_id)
        return None if key is None else self._records[key]

    def records(self) -> list[Any]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._keys


_MS_BITS = 44  # the finished memory's ints: gen << _MS_BITS | finished at (ms)
TRANSITION_FIELDS = ("task_id", "shard", "kind", "expected_gen", "old_due_ms", "due_ms", "attempt",
                     "error", "task")


class ReferenceFired:
    """Fired in Python: a task waiting for a worker, then its delivery's lease."""

    __slots__ = ("record", "batches", "since", "fired_at", "held_gen", "written", "gen", "due_ms",
                 "consumer", "delivery_id")

    def __init__(self, record: Any, batches: list[Any], since: int, fired_at: int) -> None:
        self.record, self.batches, self.since, self.fired_at = record, batches, since, fired_at
        self.held_gen = self.gen = self.due_ms = 0
        self.written = False
        self.consumer: Any = None
        self.delivery_id: str | None = None


def take_fired(records: list[Any], now: int, fired_at: int, batch: Any, finished: list[Any],
               leases: dict[str, Any], waiting: dict[str, Any], queues: dict[str, Any], unheld: list[str],
               touched: set[Any], slow: Any, record: Any = None) -> int:
    # ``record`` (a RecordShape of the records' type) only makes the compiled loops faster.
    taken = 0
    batches = [batch]  # shared by this call's Fired, never changed in place
    for rec in records:
        fin = next((entries[rec.task_id] for entries in finished if rec.task_id in entries), None)
        if fin is not None and fin >> _MS_BITS >= rec.gen:
            batch.done_one()
            continue
        qs = queues.get(rec.queue)
        if rec.task_id in leases or rec.task_id in waiting or qs is None:
            slow(rec)
            continue
        fired = ReferenceFired(rec, batches, now, fired_at)
        waiting[rec.task_id] = fired
        unheld.append(rec.task_id)
        qs.ready.append(fired)
        touched.add(qs)
        taken += 1
    return taken


def fill(ready: deque[Any], waiting: dict[str, Any], leases: dict[str, Any], consumer: Any,
         in_flight: dict[str, Any], room: int, now: int, shortest_lease_ms: int,
         record: Any = None) -> tuple[list[Any], int]:
    sent = []
    while room > 0 and ready:
        fired: ReferenceFired = ready.popleft()
        rec = fired.record
        if rec.task_id not in waiting or waiting[rec.task_id] is not fired:
            continue  # cancelled or superseded while it waited
        del waiting[rec.task_id]
        room -= 1
        fired.gen = rec.gen + 1
        fired.consumer = consumer
        fired.delivery_id = f"{rec.task_id}.{fired.gen}"
        fired.due_ms = now + rec.lease_ms
        shortest_lease_ms = min(shortest_lease_ms, rec.lease_ms)
        in_flight[fired.delivery_id] = fired
        leases[rec.task_id] = fired
        sent.append(fired)
    return sent, shortest_lease_ms


def settle_acks(delivery_ids: Iterable[str], in_flight: dict[str, Any], leases: dict[str, Any],
                finished: Any, now: int, transition: Any, succeed: Any, elsewhere: Any,
                traced: list[Any] | None = None,
                record: Any = None) -> tuple[list[Any], list[Any], list[str], int]:
    if tuple(transition.fields) != TRANSITION_FIELDS:
        raise TypeError(f"transition must be a RecordShape of the fields {TRANSITION_FIELDS}")
    transitions, confirm, forget = [], [], []
    coalesced = 0
    for delivery_id in delivery_ids:
        lease = in_flight.pop(delivery_id, None) or elsewhere(delivery_id)
        if lease is None:
            continue
        rec = lease.record
        if leases.get(rec.task_id) is lease:
            del leases[rec.task_id]
        finished[rec.task_id] = lease.gen << _MS_BITS | now
        if lease.written:
            superseded = (lease.gen, lease.due_ms)
            forget.append(rec.task_id)
        else:
            lease.written = True
            coalesced += 1
            superseded = (rec.gen, rec.due_ms)
            confirm.append(lease.batches)
            if lease.held_gen:
                forget.append(rec.task_id)
        values = (rec.task_id, rec.shard, succeed, *superseded, 0, 0, "", None)
        transitions.append(transition.build(values))
        if traced is not None:
            traced.append(lease)
    return transitions, confirm, forget, coalesced


class ReferenceBatcher:
    """Same behaviour as taskwheel.core.Batcher: a dict of (first_ms, items) per partition."""

    def __init__(self, max_items: int, max_delay_ms: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must not be negative, got {max_delay_ms}")
        self.max_items = max_items
        self.max_delay_ms = max_delay_ms
        self._groups: dict[Hashable, tuple[int, int, list[Any]]] = {}  # (first_ms, opened, items)
        self._opened = 0

    def add(self, partition: Hashable, item: Any, now_ms: int) -> tuple[Hashable, list[Any]] | None:
        if partition not in self._groups:
            self._opened += 1
            self._groups[partition] = (now_ms, self._opened, [])
        items = self._groups[partition][2]
        items.append(item)
        if len(items) >= self.max_items:
            del self._groups[partition]
            return partition, items
        return None

    def add_many(self, partitions: Iterable[Hashable], items: Iterable[Any],
                 now_ms: int) -> list[tuple[Hashable, list[Any]]]:
        ps, xs = list(partitions), list(items)
        if len(ps) != len(xs):
            raise ValueError(f"partitions and items differ in length: {len(ps)} != {len(xs)}")
        full = [self.add(p, x, now_ms) for p, x in zip(ps, xs)]
        return [batch for batch in full if batch is not None]

    def _oldest_first(self) -> list[Hashable]:
        return sorted(self._groups, key=lambda p: self._groups[p][:2])

    def due(self, now_ms: int) -> list[tuple[Hashable, list[Any]]]:
        due = [p for p in self._oldest_first() if now_ms - self._groups[p][0] >= self.max_delay_ms]
        return [(p, self._groups.pop(p)[2]) for p in due]

    def drain(self) -> list[tuple[Hashable, list[Any]]]:
        return [(p, self._groups.pop(p)[2]) for p in self._oldest_first()]

    def next_flush_ms(self) -> int | None:
        if not self._groups:
            return None
        return min(min(first for first, _, _ in self._groups.values()) + self.max_delay_ms, INT64_MAX)

    @property
    def groups(self) -> int:
        return len(self._groups)

    def __len__(self) -> int:
        return sum(len(items) for _, _, items in self._groups.values())


class ReferenceRecordShape:
    """RecordShape in Python: the same checks, slots set with setattr."""

    def __init__(self, kind: type, fields: Iterable[str], converters: Any = None) -> None:
        names = tuple(fields)
        if getattr(kind, "__new__") is not object.__new__ or hasattr(kind, "__post_init__"):
            raise TypeError(f"{kind.__name__} has its own __new__ or __post_init__: call it instead")
        slots: set[str] = set()
        for klass in kind.__mro__:
            declared = klass.__dict__.get("__slots__", ())
            slots.update((declared,) if isinstance(declared, str) else declared)
        if set(names) != slots or len(set(names)) != len(names):
            raise TypeError(f"fields must name each slot of {kind.__name__} once: {sorted(slots)}")
        for name in names:
            if type(getattr(kind, name)).__name__ != "member_descriptor":
                raise TypeError(f"{kind.__name__}.{name} is not a slot")
        converters = [None] * len(names) if converters is None else list(converters)
        if len(converters) != len(names):
            raise ValueError(f"{len(converters)} converters for {len(names)} fields")
        for name, converter in zip(names, converters):
            if converter is not None and not isinstance(converter, dict) and not callable(converter):
                raise TypeError(f"the converter of {name} is neither a dict nor callable")
        self.kind, self.fields, self.count, self._converters = kind, names, len(names), converters

    def build(self, values: Any) -> Any:
        if len(values) != self.count:
            raise ValueError(f"{len(values)} values for {self.count} fields")
        obj: Any = object.__new__(self.kind)
        for name, converter, value in zip(self.fields, self._converters, values):
            if converter is not None:
                value = converter[value] if type(converter) is dict else converter(value)
            setattr(obj, name, value)
        return obj


class ReferenceSqliteReader:
    """SqliteReader through Python's sqlite3 module: one row stepped at a time, with the GIL."""

    def __init__(self, path: str | bytes | os.PathLike[str], sql: str, busy_timeout_ms: int = 5000,
                 cache_kib: int = 65536):
        from taskwheel.core import SqliteReadError

        self._error = SqliteReadError
        self.path = os.fsdecode(path)
        self._sql = sql
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                f"file:{urllib.parse.quote(self.path)}?mode=ro", uri=True, isolation_level=None,
                check_same_thread=False,
            )
            self._conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            self._conn.execute(f"PRAGMA cache_size = -{cache_kib}")
            self._conn.execute("PRAGMA query_only = ON")
            self._conn.execute(f"EXPLAIN {sql}", (0,) * sql.count("?")).fetchall()  # it prepares
        except sqlite3.ProgrammingError:
            pass  # prepared, but a parameter is not a plain "?": rows() will tell
        except sqlite3.Error as e:
            raise SqliteReadError(f"cannot open {self.path}: {e}") from e

    def rows(self, params: tuple[int, ...]) -> list[tuple[Any, ...]]:
        return self._run(params)[1]

    def records(self, params: tuple[int, ...], shape: Any) -> list[Any]:
        columns, rows = self._run(params)
        if columns != shape.count:
            raise ValueError(
                f"the statement has {columns} columns, {shape.kind.__name__} {shape.count} fields")
        return [shape.build(row) for row in rows]

    def _run(self, params: tuple[int, ...]) -> tuple[int, list[tuple[Any, ...]]]:
        if self._conn is None:
            raise self._error(f"{self.path}: the reader is closed")
        try:
            cursor = self._conn.execute(self._sql, params)
            return len(cursor.description or ()), cursor.fetchall()
        except sqlite3.ProgrammingError as e:  # the wrong number of parameters
            raise ValueError(str(e)) from e
        except sqlite3.Error as e:
            raise self._error(f"{self.path}: {e}") from e

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
