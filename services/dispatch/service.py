"""Dispatch: the fired tasks it holds between the timer's fire and the worker's answer, the
workers it streams them to, and its loops.

A lease is not a timer of dispatch's own: delivering attempt *a* of a task at gen *g* writes
the task's next due row (gen g+1, attempt a+1) at the lease's expiry. If the ack comes, the
task ends SUCCEEDED and that row is dead; if not, the timer fires it as the redelivery, even
when this process died meanwhile. Transitions go through one FIFO writer
(taskwheel.dispatch.writer), so a task's ack is never applied before its lease.

The lease write waits ``lease_write_delay_ms``, or half the lease when that is shorter, so the
row is always written before the lease expires: a worker that answers sooner settles the
delivery with one write instead of two. Until either write is durable the timer holds the task
unconfirmed, so a crash in that window re-fires it rather than losing it.

What runs once per task (taking fired tasks, filling a worker's message, settling acks) is
compiled (taskwheel.dispatch.leases, over the tables of a ``DispatchState``); the rarer
branches (redeliveries, reloaded copies) are here.
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
from collections import deque
from typing import Sequence

from taskwheel import telemetry
from taskwheel.clock import SYSTEM_CLOCK, Clock
from taskwheel.config import Config
from taskwheel.core import RecordShape, untrack_list
from taskwheel.dispatch.deliveries import encode_deliveries
from taskwheel.dispatch.finished import MS_BITS, FinishedMemory
from taskwheel.dispatch.leases import DispatchState, Fired, Take
from taskwheel.dispatch.writer import HandOver, TransitionWriter
from taskwheel.links import TimerLink
from taskwheel.stores.base import Store, Transition, TransitionKind
from taskwheel.task import TASK_RECORD_SLOTS, TaskRecord, TaskState, successor

log = logging.getLogger("taskwheel.dispatch")

# Fired tasks taken per turn of the event loop. A burst (100,000 tasks due on one second) taken
# whole would hold the loop for a second before the first delivery went out; in chunks, workers
# start on the first while the rest are taken. Ordinary fires are far smaller and go in one turn.
BURST_CHUNK = 4096
# The acks' SUCCEED transitions, built from C by DispatchState.settle_acks.
_TRANSITION = RecordShape(Transition, [field.name for field in dataclasses.fields(Transition)])


@dataclasses.dataclass(frozen=True, slots=True)
class Deliveries:
    """A message for the worker: a ConsumeResponse's wire bytes. Two messages' bytes one after
    the other are one response holding both's deliveries."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """The worker broke the stream's protocol: the stream ends with INVALID_ARGUMENT."""

    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Ended:
    """The worker closed its side of the stream, or the stream broke."""


ConsumerEvent = Deliveries | Refused | Ended


class Consumer:
    """One worker's stream: its queue, its deliveries out, and the events for its stream."""

    __slots__ = ("queue", "max_in_flight", "in_flight", "events")

    def __init__(self, queue: str, max_in_flight: int) -> None:
        self.queue = queue
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, Fired] = {}  # delivery_id -> its lease
        self.events: asyncio.Queue[ConsumerEvent] = asyncio.Queue()


class QueueState:
    """A queue's tasks waiting for a worker, in order, and its workers' streams."""

    __slots__ = ("ready", "consumers", "rr")

    def __init__(self) -> None:
        self.ready: deque[Fired] = deque()
        self.consumers: list[Consumer] = []
        self.rr = 0  # the consumer served last, for round robin


class DispatchService:
    """Dispatch in one process; what the timer hands fired tasks to (a DispatchLink)."""

    def __init__(self, config: Config, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = self._config = config
        self._clock = clock
        self.timer: TimerLink | None = None  # set by start
        # Tasks acked or failed in the last finished_memory_ms (see FinishedMemory).
        self.finished = FinishedMemory(config.finished_memory_ms)
        self.state = DispatchState(self.finished.newest_first(), _TRANSITION, TransitionKind.SUCCEED,
                                   TASK_RECORD_SLOTS)
        # Fired tasks in the order they started waiting, for the hold loop: (since, task ids)
        # per take, not the Fired objects, so a task sent to a worker at once is freed at once
        # instead of staying alive (and tracked by the GC) for hold_after_ms.
        self._unheld: deque[tuple[int, list[str]]] = deque()
        self._orphans: deque[tuple[int, Fired]] = deque()  # (retry at, lease) of gone workers
        # (write at, message number, leases) per message sent, their leases not yet written, as a
        # heap: one entry a message, not one a delivery; a message of short leases is due sooner
        # than the delay (half its shortest lease).
        self._unwritten: list[tuple[int, int, list[Fired]]] = []
        self._messages_sent = 0
        self._writer = TransitionWriter(config, store, self.finished, clock.now_ms)
        self._tasks: list[asyncio.Task] = []
        self.delivered = self.acked = self.nacked = self.redelivered = self.stale_acks = 0
        self.coalesced = 0  # deliveries answered before their lease was written

    # -- the timer's side -----------------------------------------------------------------------

    def hand_over(self, records: list[TaskRecord], fired_at_ms: int) -> asyncio.Future[None]:
        """Takes fired tasks at once (a burst over several turns of the loop, as ``push``);
        the future resolves once each is leased to a worker or held, durably."""
        if len(records) > BURST_CHUNK:
            return asyncio.ensure_future(self.push(records, fired_at_ms))
        batch = HandOver(asyncio.get_running_loop().create_future(), len(records))
        self._take_fired(records, fired_at_ms, batch)
        return batch.future

    async def push(self, records: list[TaskRecord], fired_at_ms: int) -> None:
        """Takes fired tasks; returns once each is leased to a worker or held, durably."""
        batch = HandOver(asyncio.get_running_loop().create_future(), len(records))
        for start in range(0, len(records), BURST_CHUNK):
            if start:
                await asyncio.sleep(0)
            self._take_fired(records[start:start + BURST_CHUNK], fired_at_ms, batch)
        await batch.future

    def _take_fired(self, records: list[TaskRecord], fired_at_ms: int, batch: HandOver) -> None:
        take = Take(batch, self._clock.now_ms(), fired_at_ms)
        # The common case, a task new to dispatch, in C; the rest (see _take_one) in its place.
        self.state.take_fired(records, take, self._take_one)
        for qs in take.touched:
            self._pump(qs)
        # Only the tasks still waiting once pumped can need a hold row. Under load nearly all
        # went to a worker just now, while their ids and dict entries are in the cache; the
        # hold loop, looking them up hold_after_ms later, would pay a miss for each. A task
        # that waits again later does so in a take of its own, which lists it anew.
        if take.unheld:
            waiting = self.state.waiting
            still = [task_id for task_id in take.unheld if task_id in waiting]
            if still:
                untrack_list(still)  # task ids only, held for hold_after_ms (see core.untrack_list)
                self._unheld.append((take.now, still))

    def _take_one(self, take: Take, rec: TaskRecord) -> None:
        """A fired task that take_fired passes back: leased or waiting already, or of a queue
        not seen before (a task acked in the race with its firing never comes here)."""
        batch = take.batch
        task_id = rec.task_id
        lease = self.state.leases.get(task_id)
        if lease is not None:
            if rec.gen < lease.gen:
                batch.done_one()  # a stale copy of a row already delivered
                return
            # The lease row fired: that delivery's lease expired.
            self._drop_lease(lease)
            self.redelivered += 1
            if rec.attempt > rec.max_attempts:
                self._finish(rec, TransitionKind.FAIL, rec.gen, rec.due_ms,
                             "lease expired on the last attempt", [batch])
                return
        waiting = self.state.waiting.get(task_id)
        if waiting is not None:
            # A Fired's list of batches is shared with the others of its take: extended by copy.
            if rec.gen < waiting.record.gen:
                batch.done_one()
            elif rec.gen == waiting.record.gen and waiting.held_gen == 0:
                waiting.batches = waiting.batches + [batch]  # a reloaded copy: confirm with the first
            else:
                # Its hold row fired while it still waits: hold it again.
                waiting.record = rec
                waiting.batches = waiting.batches + [batch]
                waiting.held_gen = 0
                waiting.since = take.now
                take.unheld.append(task_id)
            return
        waiting = self.state.waiting[task_id] = Fired(rec, [batch], take.now, take.fired_at)
        take.unheld.append(task_id)
        qs = self._queue(rec.queue)
        qs.ready.append(waiting)
        take.touched.add(qs)

    # -- the workers' side ----------------------------------------------------------------------

    def subscribe(self, queue: str, max_in_flight: int) -> Consumer:
        """A worker's stream joins ``queue``; deliveries start at once."""
        consumer = Consumer(queue, max_in_flight)
        qs = self._queue(queue)
        qs.consumers.append(consumer)
        self._pump(qs)
        return consumer

    def unsubscribe(self, consumer: Consumer) -> None:
        """The stream ended: its unacked deliveries are retried after a short grace."""
        qs = self._queue(consumer.queue)
        qs.consumers.remove(consumer)
        self._release(consumer)
        self._pump(qs)

    def queues(self) -> dict[str, QueueState]:
        return self.state.queues

    def take_back(self, queue: str) -> list[Fired]:
        """The fired tasks of ``queue`` waiting here while no worker of it is connected here,
        taken out, so that the cluster can push them to a node where one is. Their hand-overs
        (``Fired.batches``) are the caller's to confirm once they are leased or held there."""
        qs = self.state.queues.get(queue)
        if qs is None or qs.consumers or not qs.ready:
            return []
        waiting = self.state.waiting
        taken = []
        for fired in qs.ready:
            task_id = fired.record.task_id
            if waiting.get(task_id) is fired:
                del waiting[task_id]
                taken.append(fired)
        qs.ready.clear()
        return taken

    def consumed_queues(self) -> frozenset[str]:
        """The queues with a worker connected here now (the cluster's members row lists them)."""
        return frozenset(name for name, qs in self.state.queues.items() if qs.consumers)

    def pump(self, queue: str) -> None:
        """Sends ``queue``'s ready tasks to its workers with room."""
        self._pump(self._queue(queue))

    def _queue(self, name: str) -> QueueState:
        qs = self.state.queues.get(name)
        if qs is None:
            qs = self.state.queues[name] = QueueState()
        return qs

    def _pump(self, qs: QueueState) -> None:
        """Sends ready tasks to consumers with room, round robin, one message per consumer."""
        if not qs.ready or not qs.consumers:
            return
        now = self._clock.now_ms()
        consumers = qs.consumers
        for _ in range(len(consumers)):
            if not qs.ready:
                break
            qs.rr = (qs.rr + 1) % len(consumers)
            consumer = consumers[qs.rr]
            room = consumer.max_in_flight - len(consumer.in_flight)
            if room <= 0:
                continue
            sent, shortest_lease = self.state.fill(qs, consumer, room, now, self._config.lease_write_delay_ms * 2)
            if sent:
                self._messages_sent += 1
                heapq.heappush(self._unwritten, (now + shortest_lease // 2, self._messages_sent, sent))
                self.delivered += len(sent)
                # The message's wire bytes in one call (the servicer's stream sends them as they are).
                traceparents = _trace_deliveries(sent) if telemetry.enabled else None
                consumer.events.put_nowait(Deliveries(encode_deliveries(sent, traceparents, TASK_RECORD_SLOTS)))
        if self._config.lease_write_delay_ms == 0:
            self._write_leases(now)

    def ack(self, consumer: Consumer, delivery_ids: Sequence[str]) -> None:
        # The timer may hold a row of the task only if dispatch wrote one and offered it: the
        # lease row, or the hold row of a task that waited for a worker. The row that was
        # delivered has fired, so an ack before its lease was written leaves nothing to forget
        # (a stale copy the loader read meanwhile fires into the finished check).
        now = self._clock.now_ms()
        traced: list[Fired] | None = [] if telemetry.enabled else None
        transitions, confirm, forget, coalesced = self.state.settle_acks(
            consumer, delivery_ids, self.finished.adding(now), now, self._lease_elsewhere, traced)
        if traced:
            for lease in traced:
                _trace_task("dispatch.ack", lease.record, lease.gen)
        if transitions:
            self.acked += len(transitions)
            self.coalesced += coalesced
            self.finished.forget_before(now - self._config.finished_memory_ms, len(transitions))
            self._writer.write(transitions, None, confirm)
            if forget:
                self._forget(forget)

    def nack(self, consumer: Consumer, delivery_ids: Sequence[str], error: str, retry_after_ms: int,
             no_retry: bool) -> None:
        now = self._clock.now_ms()
        error = error or "nacked by worker"
        for delivery_id in delivery_ids:
            lease = self._take_lease(consumer, delivery_id)
            if lease is None:
                continue
            self.nacked += 1
            if telemetry.enabled:
                _trace_task("dispatch.nack", lease.record, lease.gen, error)
            self._retry_or_fail(lease, error, retry_after_ms, no_retry, now)

    def _take_lease(self, consumer: Consumer, delivery_id: str) -> Fired | None:
        lease = consumer.in_flight.pop(delivery_id, None) or self._lease_elsewhere(delivery_id)
        if lease is not None and self.state.leases.get(lease.record.task_id) is lease:
            del self.state.leases[lease.record.task_id]
        return lease

    def _lease_elsewhere(self, delivery_id: str) -> Fired | None:
        """The lease of a delivery not in flight on the answering stream: delivered on an earlier
        stream of a worker that reconnected, still good if current."""
        lease = self.state.leases.get(delivery_id.rpartition(".")[0])
        if lease is None or lease.delivery_id != delivery_id:
            self.stale_acks += 1  # expired and redelivered, or never ours
            return None
        lease.consumer.in_flight.pop(delivery_id, None)
        return lease

    # -- transitions ----------------------------------------------------------------------------

    def _write_leases(self, now: int) -> None:
        """Writes the leases of deliveries sent before the delay that are still unanswered."""
        unwritten = self._unwritten
        transitions = []
        successors = []
        confirm = []
        while unwritten and unwritten[0][0] <= now:
            sent = heapq.heappop(unwritten)[2]
            for lease in sent:
                if lease.written:
                    continue  # answered within the delay: settled with one write
                lease.written = True
                rec = lease.record
                next_row = successor(rec, lease.gen, lease.due_ms, rec.attempt + 1, TaskState.LEASED,
                                     rec.last_error)
                transitions.append(Transition(rec.task_id, rec.shard, TransitionKind.LEASE, rec.gen, rec.due_ms,
                                              due_ms=lease.due_ms, attempt=next_row.attempt, task=next_row))
                successors.append(next_row)
                confirm.append(lease.batches)
        if transitions:
            self._writer.write(transitions, successors, confirm)

    def _settle(self, lease: Fired) -> tuple[int, int, list]:
        """(gen, due_ms, hand-overs) of the row a final transition of this delivery supersedes:
        the lease row once written, else the delivered row, whose lease is dropped."""
        if lease.written:
            return lease.gen, lease.due_ms, []
        lease.written = True
        self.coalesced += 1
        return lease.record.gen, lease.record.due_ms, lease.batches

    def _retry_or_fail(self, lease: Fired, error: str, retry_after: int, no_retry: bool, now: int) -> None:
        rec = lease.record
        gen, due_ms, batches = self._settle(lease)
        if no_retry or rec.attempt >= rec.max_attempts:
            self._finish(rec, TransitionKind.FAIL, gen, due_ms, error, batches)
            return
        if retry_after <= 0:
            retry_after = min(self._config.retry_base_ms << min(rec.attempt - 1, 30), self._config.retry_max_ms)
        next_row = successor(rec, gen + 1, now + retry_after, rec.attempt + 1, TaskState.SCHEDULED, error)
        self._writer.write([Transition(rec.task_id, rec.shard, TransitionKind.RETRY, gen, due_ms,
                                       due_ms=next_row.due_ms, attempt=next_row.attempt, error=error,
                                       task=next_row)],
                           [next_row], [batches])

    def _finish(self, rec: TaskRecord, kind: TransitionKind, gen: int, due_ms: int, error: str,
                batches: list) -> None:
        self._remember_finished(rec.task_id, gen + 1, self._clock.now_ms())
        self._writer.write([Transition(rec.task_id, rec.shard, kind, gen, due_ms, error=error)], None, [batches])
        self._forget([rec.task_id])

    def _remember_finished(self, task_id: str, gen: int, now: int) -> None:
        self.finished.adding(now)[task_id] = gen << MS_BITS | now
        self.finished.forget_before(now - self._config.finished_memory_ms, 1)

    def _forget(self, task_ids: list[str]) -> None:
        if self.timer is not None:
            self.timer.forget(task_ids)

    def _drop_lease(self, lease: Fired) -> None:
        lease.consumer.in_flight.pop(lease.delivery_id, None)
        if self.state.leases.get(lease.record.task_id) is lease:
            del self.state.leases[lease.record.task_id]

    def _release(self, consumer: Consumer) -> None:
        """A worker went away: its unacked deliveries are retried after a short grace (it may
        reconnect and ack them), not at their lease expiry."""
        deadline = self._clock.now_ms() + self._config.orphan_grace_ms
        for lease in consumer.in_flight.values():
            self._orphans.append((deadline, lease))
        consumer.in_flight = {}

    def _retry_orphans(self, now: int) -> None:
        while self._orphans and self._orphans[0][0] <= now:
            _, lease = self._orphans.popleft()
            if self.state.leases.get(lease.record.task_id) is lease:
                del self.state.leases[lease.record.task_id]
                self._retry_or_fail(lease, "worker disconnected", 1, False, now)

    # -- loops ----------------------------------------------------------------------------------

    async def start(self, timer: TimerLink) -> None:
        """Starts the writer and the loops; ``timer`` is told of the rows dispatch writes."""
        self.timer = timer
        self._writer.start(timer)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._hold_loop(), name="dispatch-hold"),
                       loop.create_task(self._lease_loop(), name="dispatch-lease")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._writer.stop()

    async def _lease_loop(self) -> None:
        delay = min(self._config.lease_write_delay_ms, self._config.limits.min_lease_ms // 2)
        while True:
            await self._clock.sleep(max(delay, 4) / 4000)
            if self._unwritten:
                self._write_leases(self._clock.now_ms())

    async def _hold_loop(self) -> None:
        """Gives tasks that wait for a worker a durable hold row, confirming them to the timer;
        retries the deliveries of workers that went away and did not come back."""
        while True:
            await self._clock.sleep(min(self._config.hold_after_ms, self._config.orphan_grace_ms) / 4000)
            now = self._clock.now_ms()
            self._retry_orphans(now)
            horizon = now - self._config.hold_after_ms
            transitions = []
            successors = []
            confirm = []
            unheld = self._unheld
            while unheld and unheld[0][0] <= horizon:
                started, task_ids = unheld.popleft()
                for task_id in task_ids:
                    waiting = self.state.waiting.get(task_id)
                    if waiting is None or waiting.since != started or waiting.held_gen:
                        continue
                    rec = waiting.record
                    due = now + self._config.hold_ms
                    next_row = successor(rec, rec.gen + 1, due, rec.attempt, rec.state, rec.last_error)
                    waiting.held_gen = next_row.gen
                    transitions.append(Transition(rec.task_id, rec.shard, TransitionKind.RETRY, rec.gen,
                                                  rec.due_ms, due_ms=due, attempt=rec.attempt,
                                                  error=rec.last_error, task=next_row))
                    successors.append(next_row)
                    confirm.append(waiting.batches)
                    waiting.record = next_row
                    waiting.batches = []
            if transitions:
                self._writer.write(transitions, successors, confirm)


def _trace_deliveries(sent: list[Fired]) -> list[str]:
    """A span per delivery in the task's trace; returns the traceparents the worker continues from."""
    tracer = telemetry.tracer
    traceparents = []
    for lease in sent:
        rec = lease.record
        ctx = telemetry.context_from_traceparent(rec.traceparent) if rec.traceparent else None
        span = tracer.start_span("dispatch.deliver", context=ctx, attributes={
            "taskwheel.task_id": rec.task_id, "taskwheel.attempt": rec.attempt, "taskwheel.queue": rec.queue})
        sc = span.get_span_context()
        traceparents.append(f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}")
        span.end()
    return traceparents


def _trace_task(name: str, rec: TaskRecord, gen: int, error: str = "") -> None:
    ctx = telemetry.context_from_traceparent(rec.traceparent) if rec.traceparent else None
    attributes = {"taskwheel.task_id": rec.task_id, "taskwheel.attempt": rec.attempt,
                  "taskwheel.queue": rec.queue, "taskwheel.gen": gen}
    if error:
        attributes["taskwheel.error"] = error
    telemetry.tracer.start_span(name, context=ctx, attributes=attributes).end()
