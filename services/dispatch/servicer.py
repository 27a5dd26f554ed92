"""The dispatch service: servicer, then its state (queues, consumers, leases), then its loops.

A lease is not a timer of dispatch's own: delivering attempt *a* of a task at gen *g* writes
the task's next due row (gen g+1, attempt a+1) at the lease's expiry. If the ack comes, the
task ends SUCCEEDED and that row is dead; if not, the timer fires it as the redelivery, even
when this process died meanwhile. Transitions go through one FIFO group-commit writer, so a
task's ack is never applied before its lease.

The lease write waits ``lease_write_delay_ms`` (250 ms), or half the lease when that is
shorter, so the row is always written before the lease expires: a worker that answers sooner
settles the delivery with one write instead of two. Until either write is durable the timer
holds the task unconfirmed, so a crash in that window re-fires it rather than losing it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import logging
from collections import deque

import grpc

from taskwheel import telemetry
from taskwheel.clock import now_ms
from taskwheel.config import Config
from taskwheel.core import RecordShape, shard_of, untrack, untrack_list
from taskwheel.dispatch.deliveries import encode_deliveries
from taskwheel.dispatch.leases import FinishedGeneration, Fired, fill, settle_acks, take_fired
from taskwheel.group_commit import GroupCommit
from taskwheel.stores.base import Store, Transition, TransitionKind
from taskwheel.task import TASK_RECORD_SLOTS, TaskRecord, TaskState, successor, untracked
from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc
from taskwheel.wire import add_service, record_of_due

log = logging.getLogger("taskwheel.dispatch")

# Fired tasks taken per turn of the event loop. A burst (100,000 tasks due on one second) taken
# whole held the loop for a second before the first delivery went out; in chunks, workers start
# on the first while the rest are taken. Ordinary fires are far smaller and go in one turn.
BURST_CHUNK = 4096
_MS_BITS = 44  # wall-clock milliseconds fit until the year 2527
# The acks' SUCCEED transitions, built from C by settle_acks.
_TRANSITION = RecordShape(Transition, [field.name for field in dataclasses.fields(Transition)])


class DispatchService(dispatch_pb2_grpc.DispatchServicer):
    """``timer`` is anything with ``async offer(records)`` and ``async forget(task_ids)``; the
    TimerService of this process, which also has ``offer_now`` and ``forget_now``, is called
    directly instead, without a task per call."""

    # -- servicer ---------------------------------------------------------------------------

    async def Consume(self, request_iterator, context):
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "subscribe":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message must be subscribe{queue, max_in_flight}")
        sub = first.subscribe
        if not sub.queue:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subscribe.queue is required")
        limit = self._config.limits.max_in_flight
        if sub.max_in_flight > limit:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"subscribe.max_in_flight {sub.max_in_flight} is over the limit of {limit}",
            )
        consumer = _Consumer(sub.queue, sub.max_in_flight or self._config.default_max_in_flight)
        qs = self._queue(sub.queue)
        qs.consumers.append(consumer)
        reader = asyncio.get_running_loop().create_task(self._read(consumer, request_iterator))
        self._pump(qs)
        out = consumer.out
        after = None  # an end of stream or an error taken while merging, for the next turn
        try:
            while True:
                msg = after if after is not None else await out.get()
                after = None
                if msg is None:
                    break
                if isinstance(msg, str):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)
                # Messages that queued while the last one was written go out as one: a write
                # costs a few turns of the loop, so under load they queue faster than they leave.
                # A message is its wire bytes (see _pump), and two responses' bytes one after
                # the other are one response holding both's deliveries.
                if not out.empty():
                    parts = [msg]
                    while not out.empty():
                        more = out.get_nowait()
                        if more is None or isinstance(more, str):
                            after = more
                            break
                        parts.append(more)
                    msg = b"".join(parts)
                yield msg
        finally:
            reader.cancel()
            qs.consumers.remove(consumer)
            self._release(consumer, "worker disconnected")
            self._pump(qs)

    async def Push(self, request, context):
        records = untracked([record_of_due(m, self._shard_of) for m in request.tasks])
        await self.push(records, request.fired_at_ms)
        return dispatch_pb2.PushResponse(accepted=len(records))

    async def Status(self, request, context):
        status = dispatch_pb2.DispatchStatus(
            delivered=self.delivered, acked=self.acked, nacked=self.nacked, redelivered=self.redelivered
        )
        for name, qs in sorted(self._queues.items()):
            status.queues.add(
                queue=name,
                ready=len(qs.ready),
                in_flight=sum(len(c.in_flight) for c in qs.consumers),
                workers=len(qs.consumers),
            )
        return status

    def add_to_server(self, server) -> None:
        """dispatch_pb2_grpc.add_DispatchServicer_to_server, but Consume's responses are the
        ConsumeResponse wire bytes _pump encodes, which grpc sends unchanged."""
        add_service(server, dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"], self,
                    raw_responses={"Consume"})

    # -- state ------------------------------------------------------------------------------

    def __init__(self, config: Config, store: Store, timer) -> None:
        self._config = config
        self._store = store
        self.timer = timer
        self._num_shards = store.num_shards
        self._queues: dict[str, _QueueState] = {}
        self._waiting: dict[str, Fired] = {}  # task_id -> fired, not yet sent to a worker
        self._leases: dict[str, Fired] = {}  # task_id -> its outstanding delivery
        # Tasks acked or failed in the last finished_memory_ms (see _FinishedMemory).
        self._finished = _FinishedMemory(config.finished_memory_ms)
        # Fired tasks in the order they started waiting, for the hold loop: (since, task ids)
        # per take, not the Fired objects, so a task sent to a worker at once is freed at
        # once instead of staying alive (and tracked by the GC) for hold_after_ms.
        self._unheld: deque[tuple[int, list[str]]] = deque()
        self._orphans: deque[tuple[int, Fired]] = deque()  # (retry at, lease) of gone workers
        # (write at, message number, leases) per message sent, their leases not yet written, as a
        # heap: one entry a message, not one a delivery; a message of short leases is due sooner
        # than the delay (half its shortest lease).
        self._unwritten: list[tuple[int, int, list[Fired]]] = []
        self._messages_sent = 0
        # In order: a task's ack must not overtake its lease. A store that applies one call at a
        # time in arrival order (ordered_apply_depth > 1) takes the next batch while one runs.
        self._writer = GroupCommit(self._apply, max_batch=config.write_batch, max_pending=1 << 62,
                                   concurrency=store.ordered_apply_depth,
                                   overlap_at=config.write_batch // 2,
                                   linger_s=config.transition_linger_ms / 1000)
        self._tasks: list[asyncio.Task] = []
        self.delivered = self.acked = self.nacked = self.redelivered = self.stale_acks = 0
        self.coalesced = 0  # deliveries answered before their lease was written

    def _shard_of(self, task_id: str) -> int:
        return shard_of(task_id, self._num_shards)

    def _queue(self, name: str) -> "_QueueState":
        qs = self._queues.get(name)
        if qs is None:
            qs = self._queues[name] = _QueueState()
        return qs

    async def push(self, records: list[TaskRecord], fired_at_ms: int) -> None:
        """Takes fired tasks; returns once each is leased to a worker or held, durably."""
        batch = _Batch(asyncio.get_running_loop().create_future(), len(records))
        for start in range(0, len(records), BURST_CHUNK):
            if start:
                await asyncio.sleep(0)
            self._take_fired(records[start:start + BURST_CHUNK], fired_at_ms, batch)
        await batch.future

    def take(self, records: list[TaskRecord], fired_at_ms: int) -> asyncio.Future:
        """``push`` for the timer of this process: takes the fired tasks at once (a burst over
        several turns of the loop, by push) and returns a future that resolves as push returns."""
        if len(records) > BURST_CHUNK:
            return asyncio.get_running_loop().create_task(self.push(records, fired_at_ms))
        batch = _Batch(asyncio.get_running_loop().create_future(), len(records))
        self._take_fired(records, fired_at_ms, batch)
        return batch.future

    def _take_fired(self, records: list[TaskRecord], fired_at_ms: int, batch: "_Batch") -> None:
        touched: set[_QueueState] = set()
        now = now_ms()
        unheld: list[str] = []  # the fired tasks now waiting; those still waiting after the pump are kept
        # The common case, a task new to dispatch, in C; the rest (see _take_one) in its place.
        take_fired(records, now, fired_at_ms, batch, self._finished.newest_first(), self._leases,
                   self._waiting, self._queues, unheld, touched,
                   functools.partial(self._take_one, batch, now, fired_at_ms, unheld, touched), TASK_RECORD_SLOTS)
        for qs in touched:
            self._pump(qs)
        # Only the tasks still waiting once pumped can need a hold row. Under load nearly all
        # went to a worker just now, and their ids and dict entries are still in the cache;
        # the hold loop, looking them up hold_after_ms later, paid a miss for each (8-16 ms a
        # pass at 50K fires/s, two passes a second). A task that waits again later does so in
        # a take of its own, which lists it anew.
        if unheld:
            waiting = self._waiting
            still = [task_id for task_id in unheld if task_id in waiting]
            if still:
                untrack_list(still)  # task ids only, held for hold_after_ms (see core.untrack_list)
                self._unheld.append((now, still))

    def _take_one(self, batch: "_Batch", now: int, fired_at_ms: int, unheld: list[str],
                  touched: set["_QueueState"], rec: TaskRecord) -> None:
        """A fired task that take_fired passes back: leased or waiting already, or of a queue
        not seen before (a task acked in the race with its firing never comes here)."""
        task_id = rec.task_id
        lease = self._leases.get(task_id)
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
        waiting = self._waiting.get(task_id)
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
                waiting.since = now
                unheld.append(task_id)
            return
        waiting = self._waiting[task_id] = Fired(rec, [batch], now, fired_at_ms)
        unheld.append(task_id)
        qs = self._queue(rec.queue)
        qs.ready.append(waiting)
        touched.add(qs)

    def _pump(self, qs: "_QueueState") -> None:
        """Sends ready tasks to consumers with room, round robin, one message per consumer."""
        if not qs.ready or not qs.consumers:
            return
        now = now_ms()
        ready = qs.ready
        waiting_by_task = self._waiting
        leases = self._leases
        consumers = qs.consumers
        for _ in range(len(consumers)):
            if not ready:
                break
            qs.rr = (qs.rr + 1) % len(consumers)
            consumer = consumers[qs.rr]
            in_flight = consumer.in_flight
            room = consumer.max_in_flight - len(in_flight)
            if room <= 0:
                continue
            sent, shortest_lease = fill(ready, waiting_by_task, leases, consumer, in_flight, room, now,
                                        self._config.lease_write_delay_ms * 2, TASK_RECORD_SLOTS)
            if sent:
                self._messages_sent += 1
                heapq.heappush(self._unwritten, (now + shortest_lease // 2, self._messages_sent, sent))
                self.delivered += len(sent)
                # The message's wire bytes in one call (the servicer's stream sends them as they are).
                traceparents = _trace_deliveries(sent) if telemetry.enabled else None
                consumer.out.put_nowait(encode_deliveries(sent, traceparents, TASK_RECORD_SLOTS))
        if self._config.lease_write_delay_ms == 0:
            self._write_leases(now)

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
            self._write(transitions, successors, confirm)

    def _settle(self, lease: Fired) -> tuple[int, int, list]:
        """(gen, due_ms, push batches) of the row a final transition of this delivery
        supersedes: the lease row once written, else the delivered row, whose lease is dropped."""
        if lease.written:
            return lease.gen, lease.due_ms, []
        lease.written = True
        self.coalesced += 1
        return lease.record.gen, lease.record.due_ms, lease.batches

    def _write(self, transitions: list[Transition], successors: list[TaskRecord] | None,
               confirm: list[list[_Batch]]) -> None:
        """Queues transitions for the writer. Once durable, each applied transition's successor
        record (``successors`` lines up with ``transitions``; None: none has one) goes to the
        timer, and every push batch in ``confirm`` (lists of them) counts one task handed over
        per appearance."""
        fut = self._writer.commit(transitions)
        # Out of the cyclic GC's view while they wait for the writer: when it falls behind, a
        # second of acks waits (100,000 transitions and as many lists at 50K acks/s), and each
        # young collection walked them all, 50-220 ms a pause. A transition holds strings,
        # numbers, a kind and an untracked record; a list of push batches holds _Batch objects,
        # whose futures lead only to the long-lived services: neither can be in a garbage
        # cycle, so reference counting frees them.
        untrack(transitions, Transition)
        # The lists of batches are shared by a take's Fired (core.take_fired) and never changed
        # in place: that, not untrack_list's check, is what keeps them safe out of view.
        untrack(confirm, list)
        untrack_list(transitions)
        untrack_list(confirm)
        if successors is not None:
            untracked(successors)  # offered to the timer once written: held until due
        fut.add_done_callback(functools.partial(self._written, successors, confirm))

    def _written(self, successors: list[TaskRecord] | None, confirm: list[list[_Batch]],
                 fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("store rejected %s; the checkpoint keeps the tasks for a restart", exc)
            return
        if confirm:
            _confirm(confirm)
        if successors is not None:
            # Not the rows of tasks answered while their write was queued: forgotten already,
            # offered now they would sit in the wheel until they fire (a lease: 30 s).
            finished = self._finished
            offers = [next_row for applied, next_row in zip(fut.result(), successors)
                      if applied and (finished.get(next_row.task_id) >> _MS_BITS) < next_row.gen]
            if offers:
                self._offer(offers)

    def _offer(self, records: list[TaskRecord]) -> None:
        offer_now = getattr(self.timer, "offer_now", None)
        if offer_now is not None:
            offer_now(records)
        else:
            asyncio.get_running_loop().create_task(self.timer.offer(records))

    def _forget(self, task_ids: list[str]) -> None:
        forget_now = getattr(self.timer, "forget_now", None)
        if forget_now is not None:
            forget_now(task_ids)
        else:
            asyncio.get_running_loop().create_task(self.timer.forget(task_ids))

    async def _apply(self, transitions: list[Transition]) -> list[bool]:
        """The writer's store call."""
        return await self._store.apply(transitions, now_ms())

    async def _read(self, consumer: "_Consumer", request_iterator) -> None:
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                if kind == "ack":
                    self._ack(consumer, req.ack.delivery_ids)
                elif kind == "nack":
                    self._nack(consumer, req.nack)
                else:
                    consumer.out.put_nowait(f"unexpected {kind or 'empty'} message after subscribe")
                    return
                self._pump(self._queue(consumer.queue))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("consumer stream ended: %s", exc)
        consumer.out.put_nowait(None)

    def _take_lease(self, consumer: "_Consumer", delivery_id: str) -> Fired | None:
        lease = consumer.in_flight.pop(delivery_id, None) or self._lease_elsewhere(delivery_id)
        if lease is not None and self._leases.get(lease.record.task_id) is lease:
            del self._leases[lease.record.task_id]
        return lease

    def _lease_elsewhere(self, delivery_id: str) -> Fired | None:
        """The lease of a delivery not in flight on the answering stream: delivered on an earlier
        stream of a worker that reconnected, still good if current."""
        lease = self._leases.get(delivery_id.rpartition(".")[0])
        if lease is None or lease.delivery_id != delivery_id:
            self.stale_acks += 1  # expired and redelivered, or never ours
            return None
        lease.consumer.in_flight.pop(delivery_id, None)
        return lease

    def _ack(self, consumer: "_Consumer", delivery_ids) -> None:
        # The timer may hold a row of the task only if dispatch wrote one and offered it: the
        # lease row, or the hold row of a task that waited for a worker. The row that was
        # delivered has fired, so an ack before its lease was written leaves nothing to forget
        # (a stale copy the loader read meanwhile fires into the finished check).
        now = now_ms()
        traced: list[Fired] | None = [] if telemetry.enabled else None
        transitions, confirm, forget, coalesced = settle_acks(
            delivery_ids, consumer.in_flight, self._leases, self._finished.adding(now), now, _TRANSITION,
            TransitionKind.SUCCEED, self._lease_elsewhere, traced, TASK_RECORD_SLOTS)
        if traced:
            for lease in traced:
                _trace_task("dispatch.ack", lease.record, lease.gen)
        if transitions:
            self.acked += len(transitions)
            self.coalesced += coalesced
            self._finished.forget_before(now - self._config.finished_memory_ms, len(transitions))
            self._write(transitions, None, confirm)
            if forget:
                self._forget(forget)

    def _nack(self, consumer: "_Consumer", nack) -> None:
        now = now_ms()
        retry_after = nack.retry_after.seconds * 1000 + nack.retry_after.nanos // 1_000_000
        error = nack.error or "nacked by worker"
        for delivery_id in nack.delivery_ids:
            lease = self._take_lease(consumer, delivery_id)
            if lease is None:
                continue
            self.nacked += 1
            if telemetry.enabled:
                _trace_task("dispatch.nack", lease.record, lease.gen, error)
            self._retry_or_fail(lease, error, retry_after, nack.no_retry, now)

    def _retry_or_fail(self, lease: Fired, error: str, retry_after: int, no_retry: bool, now: int) -> None:
        rec = lease.record
        gen, due_ms, batches = self._settle(lease)
        if no_retry or rec.attempt >= rec.max_attempts:
            self._finish(rec, TransitionKind.FAIL, gen, due_ms, error, batches)
            return
        if retry_after <= 0:
            retry_after = min(self._config.retry_base_ms << min(rec.attempt - 1, 30), self._config.retry_max_ms)
        next_row = successor(rec, gen + 1, now + retry_after, rec.attempt + 1, TaskState.SCHEDULED, error)
        self._write([Transition(rec.task_id, rec.shard, TransitionKind.RETRY, gen, due_ms,
                                due_ms=next_row.due_ms, attempt=next_row.attempt, error=error,
                                task=next_row)],
                    [next_row], [batches])

    def _finish(self, rec: TaskRecord, kind: TransitionKind, gen: int, due_ms: int, error: str,
                batches: list) -> None:
        self._remember_finished(rec.task_id, gen + 1, now_ms())
        self._write([Transition(rec.task_id, rec.shard, kind, gen, due_ms, error=error)], None, [batches])
        self._forget([rec.task_id])

    def _remember_finished(self, task_id: str, gen: int, now: int) -> None:
        self._finished.adding(now)[task_id] = gen << _MS_BITS | now
        self._finished.forget_before(now - self._config.finished_memory_ms, 1)

    def _drop_lease(self, lease: Fired) -> None:
        lease.consumer.in_flight.pop(lease.delivery_id, None)
        if self._leases.get(lease.record.task_id) is lease:
            del self._leases[lease.record.task_id]

    def _release(self, consumer: "_Consumer", error: str) -> None:
        """A worker went away: its unacked deliveries are retried after a short grace (it may
        reconnect and ack them), not at their lease expiry."""
        deadline = now_ms() + self._config.orphan_grace_ms
        for lease in consumer.in_flight.values():
            self._orphans.append((deadline, lease))
        consumer.in_flight = {}

    def _retry_orphans(self, now: int) -> None:
        while self._orphans and self._orphans[0][0] <= now:
            _, lease = self._orphans.popleft()
            if self._leases.get(lease.record.task_id) is lease:
                del self._leases[lease.record.task_id]
                self._retry_or_fail(lease, "worker disconnected", 1, False, now)

    # -- loops --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._writer.start()
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
            await asyncio.sleep(max(delay, 4) / 4000)
            if self._unwritten:
                self._write_leases(now_ms())

    async def _hold_loop(self) -> None:
        """Gives tasks that wait for a worker a durable hold row, confirming them to the timer;
        retries the deliveries of workers that went away and did not come back."""
        while True:
            await asyncio.sleep(min(self._config.hold_after_ms, self._config.orphan_grace_ms) / 4000)
            now = now_ms()
            self._retry_orphans(now)
            horizon = now - self._config.hold_after_ms
            transitions = []
            successors = []
            confirm = []
            unheld = self._unheld
            while unheld and unheld[0][0] <= horizon:
                started, task_ids = unheld.popleft()
                for task_id in task_ids:
                    waiting = self._waiting.get(task_id)
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
                self._write(transitions, successors, confirm)


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


class _Batch:
    __slots__ = ("future", "remaining")

    def __init__(self, future: asyncio.Future, remaining: int) -> None:
        self.future = future
        self.remaining = remaining
        if remaining == 0:
            future.set_result(None)

    def done_one(self) -> None:
        self.done(1)

    def done(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)


def _confirm(confirm: list[list[_Batch]]) -> None:
    """One done() per run of the same batch: a write's tasks mostly come from one push."""
    last = None
    count = 0
    for batches in confirm:
        for batch in batches:
            if batch is last:
                count += 1
                continue
            if last is not None:
                last.done(count)
            last, count = batch, 1
    if last is not None:
        last.done(count)


class _FinishedMemory:
    """task_id -> gen << _MS_BITS | finished at ms, for the tasks finished in the last
    ``memory_ms`` (at most ``memory_ms / GENERATIONS`` more): one int, not a tuple, since a
    tuple stays tracked by the cyclic GC (automatic collection is off) and 120 s of finished
    tasks at 40K/s made collections walk millions of them.

    In GENERATIONS dicts by time, not one: a dict that grows past its table, or whose deletes
    fill it with dummies, is rebuilt whole in one call, which stalls the event loop 12 ms at
    350K entries and 24 ms at 700K; one dict of 120 s of acks (1.2M entries at 10K/s) was
    rebuilt every ~1M acks for ~50 ms. A generation is only added to, so it grows to
    rate x memory_ms / GENERATIONS entries at most and is never rebuilt by deletes (and is
    itself split 64 ways, so it grows a 64th at a time); one past the memory is dropped whole
    and emptied a chunk per call, instead of a delete per task.
    The price: a task not found is looked up in every generation (GENERATIONS + 1 dicts),
    which is every fired task: each generation is a core.FinishedGeneration, whose Bloom
    filter answers most of those misses without touching the dict (sized at 5/4 of the
    generation before it, since acks come at about the same rate)."""

    GENERATIONS = 8
    _EMPTIED_PER_CALL = 4096  # entries of dropped generations freed per forget_before, at least

    __slots__ = ("_span", "_starts", "_newest_first", "_dropped")
    _MIN_CAPACITY = 65536  # keys a new generation's filter is sized for, at least

    def __init__(self, memory_ms: int) -> None:
        self._span = max(1, memory_ms // self.GENERATIONS)
        # The generations newest first, and when each began, in the same order.
        self._newest_first: list[FinishedGeneration] = []
        self._starts: list[int] = []
        self._dropped: list[FinishedGeneration] = []

    def adding(self, now: int) -> FinishedGeneration:
        """The generation to add the tasks finished at ``now`` to."""
        if not self._starts or now >= self._starts[0] + self._span:
            last = len(self._newest_first[0]) if self._newest_first else 0
            self._starts.insert(0, now)
            self._newest_first.insert(0, FinishedGeneration(max(self._MIN_CAPACITY, last * 5 // 4)))
        return self._newest_first[0]

    def newest_first(self) -> list[FinishedGeneration]:
        """The generations to look a task up in, in this order (the first hit is its latest
        finish); the hot path loops over them itself instead of calling get per task. One list,
        changed in place, so a caller holding it sees a task finished while it loops."""
        return self._newest_first

    def get(self, task_id: str) -> int:
        """The task's latest entry, or 0."""
        for entries in self._newest_first:
            fin = entries.get(task_id)
            if fin is not None:
                return fin
        return 0

    def forget_before(self, horizon: int, added: int) -> None:
        """Drops the generations whose every entry finished before ``horizon``, and frees a
        chunk of the entries of those dropped before: at least twice the ``added`` since the
        last call, so freeing keeps up with acks however many an ack message carries."""
        starts = self._starts
        while starts and starts[-1] + self._span <= horizon:
            starts.pop()
            self._dropped.append(self._newest_first.pop())
        dropped = self._dropped
        left = max(self._EMPTIED_PER_CALL, 2 * added)
        while dropped and left:
            left -= dropped[-1].drain(left)
            if left:  # it had fewer than asked for: it is empty now
                dropped.pop()

    def __iter__(self):
        """The task ids remembered (a task finished twice appears twice)."""
        for entries in self._newest_first:
            yield from entries


class _Consumer:
    __slots__ = ("queue", "max_in_flight", "in_flight", "out")

    def __init__(self, queue: str, max_in_flight: int) -> None:
        self.queue = queue
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, Fired] = {}
        self.out: asyncio.Queue = asyncio.Queue()


class _QueueState:
    __slots__ = ("ready", "consumers", "rr")

    def __init__(self) -> None:
        self.ready: deque[Fired] = deque()
        self.consumers: list[_Consumer] = []
        self.rr = 0
