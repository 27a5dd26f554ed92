"""Dispatch's compiled loops in plain Python, test oracles: ReferenceFired, and
ReferenceDispatchState with take_fired, fill and settle_acks as they once were in the servicer.
The tests run the same behaviours against these and taskwheel.dispatch.leases."""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable

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


class ReferenceTake:
    """Take in Python."""

    def __init__(self, batch: Any, now: int, fired_at: int) -> None:
        self.batch, self.now, self.fired_at = batch, now, fired_at
        self.unheld: list[str] = []
        self.touched: set[Any] = set()


class ReferenceDispatchState:
    """DispatchState in Python: dispatch's tables and its loops as they once were in its servicer."""

    def __init__(self, finished: list[Any], transition: Any, succeed: Any, record: Any = None) -> None:
        # ``record`` (a RecordShape of the records' type) only makes the compiled loops faster.
        if tuple(transition.fields) != TRANSITION_FIELDS:
            raise TypeError(f"transition must be a RecordShape of the fields {TRANSITION_FIELDS}")
        self.queues: dict[str, Any] = {}
        self.waiting: dict[str, Any] = {}
        self.leases: dict[str, Any] = {}
        self.finished, self.transition, self.succeed, self.record = finished, transition, succeed, record

    def take_fired(self, records: list[Any], take: Any, slow: Any) -> int:
        taken = 0
        batches = [take.batch]  # shared by this take's Fired, never changed in place
        for rec in records:
            fin = next((entries[rec.task_id] for entries in self.finished if rec.task_id in entries), None)
            if fin is not None and fin >> _MS_BITS >= rec.gen:
                take.batch.done_one()
                continue
            qs = self.queues.get(rec.queue)
            if rec.task_id in self.leases or rec.task_id in self.waiting or qs is None:
                slow(take, rec)
                continue
            fired = ReferenceFired(rec, batches, take.now, take.fired_at)
            self.waiting[rec.task_id] = fired
            take.unheld.append(rec.task_id)
            qs.ready.append(fired)
            take.touched.add(qs)
            taken += 1
        return taken

    def fill(self, qs: Any, consumer: Any, room: int, now: int,
             shortest_lease_ms: int) -> tuple[list[Any], int]:
        sent = []
        ready: deque[Any] = qs.ready
        while room > 0 and ready:
            fired: ReferenceFired = ready.popleft()
            rec = fired.record
            if self.waiting.get(rec.task_id) is not fired:
                continue  # cancelled or superseded while it waited
            del self.waiting[rec.task_id]
            room -= 1
            fired.gen = rec.gen + 1
            fired.consumer = consumer
            fired.delivery_id = f"{rec.task_id}.{fired.gen}"
            fired.due_ms = now + rec.lease_ms
            shortest_lease_ms = min(shortest_lease_ms, rec.lease_ms)
            consumer.in_flight[fired.delivery_id] = fired
            self.leases[rec.task_id] = fired
            sent.append(fired)
        return sent, shortest_lease_ms

    def settle_acks(self, consumer: Any, delivery_ids: Iterable[str], finished: Any, now: int, elsewhere: Any,
                    traced: list[Any] | None = None) -> tuple[list[Any], list[Any], list[str], int]:
        transitions, confirm, forget = [], [], []
        coalesced = 0
        for delivery_id in delivery_ids:
            lease = consumer.in_flight.pop(delivery_id, None) or elsewhere(delivery_id)
            if lease is None:
                continue
            rec = lease.record
            if self.leases.get(rec.task_id) is lease:
                del self.leases[rec.task_id]
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
            values = (rec.task_id, rec.shard, self.succeed, *superseded, 0, 0, "", None)
            transitions.append(self.transition.build(values))
            if traced is not None:
                traced.append(lease)
        return transitions, confirm, forget, coalesced
