"""The timer: servicer, then its state (the wheel and the loaded window), then its loops.

Guarantees, and how:
* Never early: a task enters the wheel with its due_ms and the wheel fires only keys whose
  deadline <= the wall clock.
* On time: the loader keeps [now, now + lookahead) in the wheel, reading the store in slices of
  slice_ms ahead of need; a task accepted inside the loaded window is offered straight in.
* Nothing lost on a crash: a fired task stays "unconfirmed" until dispatch answers that its
  successor row (the lease) is durable. The checkpoint saved every second is below every
  unconfirmed, pending or not-yet-loaded task, so a restarted timer reloads from there and
  fires whatever is still live.
* Nothing left behind by a lost offer: in a cluster, a task accepted by another node's ingest
  reaches this timer only by an offer if it is due inside the loaded window, and that node may
  die before offering it. The sweep reads each shard again below its checkpoint (every
  ``SWEEP_EVERY_MS``, ``SWEEP_LAG_MS`` behind the clock): a live row there was never loaded
  (anything loaded is fired and confirmed, hence dead, before the checkpoint passes it), so it
  fires then, at most SWEEP_LAG_MS + SWEEP_EVERY_MS late.
* Only the shards this node holds (taskwheel.cluster.shards): the ShardOwner gives the timer
  shards (``take``: each loads from its checkpoint), takes them back (``give_up``: stop, drain,
  checkpoint; ``lose``: stop at once) and says until when they may fire (``fire_until``).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Sequence

import tenacity

from taskwheel import telemetry
from taskwheel.clock import SYSTEM_CLOCK, Clock
from taskwheel.config import Config
from taskwheel.core import TimingWheel, shard_of
from taskwheel.stores.base import ShardLease, Store
from taskwheel.task import TASK_RECORD_SLOTS, TaskRecord, untracked
from taskwheel.timer.pending import PendingTasks
from taskwheel.internal.v1 import timer_pb2, timer_pb2_grpc
from taskwheel.links import DispatchLink
from taskwheel.wire import record_of_due

log = logging.getLogger("taskwheel.timer")

# Records admitted to the wheel per turn of the loop while a slice loads, so that a slice of 50K
# tasks does not hold the fire loop up: a record just built on the store's reader thread is cold
# here, and a few thousand of them take the loop milliseconds to admit.
ADMIT_CHUNK = 512
# How long the fire loop may keep firing before it lets the loop's other callbacks run. Under
# load, firing and handing over takes a millisecond or more, by which time the next
# millisecond's tasks are due: without this the loop would never yield, and the deliveries it
# made, and the acks of earlier ones, would wait behind it.
FIRE_TURN_MS = 2
# How often the sweep (see the module docstring) reads the shards below their checkpoints,
# and how far behind the clock it stays: longer than a store write may take to be acknowledged
# (a task whose write is still in flight may be offered yet).
SWEEP_EVERY_MS = 2_000
SWEEP_LAG_MS = 10_000
# How long a handoff waits for what was fired of its shards to be leased or held.
DRAIN_MS = 10_000


class TimerService(timer_pb2_grpc.TimerServicer):
    """The timer; what ingest and dispatch tell of new and ended tasks (a TimerLink). It hands
    what fires to ``dispatch``: a DispatchRouter, which hands each task to a dispatch with a worker
    for its queue."""

    # -- servicer (taskwheel.internal.v1.Timer) -------------------------------------------------

    async def Offer(self, request, context):
        records = untracked([record_of_due(m, self._shard_of) for m in request.tasks])
        taken, elsewhere = self._offer(records)
        return timer_pb2.OfferResponse(taken=taken, loaded_until_ms=self.loaded_until_ms,
                                       not_held=sorted({r.shard for r in elsewhere}))

    async def Forget(self, request, context):
        return timer_pb2.ForgetResponse(forgotten=self._forget(request.task_ids))

    async def Status(self, request, context):
        return self.status()

    # -- state ------------------------------------------------------------------------------

    def __init__(self, config: Config, store: Store, dispatch: DispatchLink, clock: Clock = SYSTEM_CLOCK) -> None:
        self._config = config
        self._store = store
        self._dispatch = dispatch
        self._clock = clock
        self._num_shards = store.num_shards
        # The shards held, and the time they may fire until (the ShardOwner's leases).
        self._shards: set[int] = set()
        self._fire_until = 0
        # Shards being loaded from their checkpoints after a take: shard -> where the load is.
        self._catching_up: dict[int, int] = {}
        # The epoch of each shard's lease, which every firing of it carries.
        self._epochs: dict[int, int] = {}
        # Shards taken from an owner that did not hand them over: rows due before this may have
        # been fired by it already, and their firings are flagged as possible repeats.
        self._suspect_until: dict[int, int] = {}
        # The sweep: on only when other nodes may accept tasks for these shards; per shard, how
        # far it has read.
        self.sweeping = False
        self._swept_until: dict[int, int] = {}
        self.swept = 0
        # The tasks in the wheel, each at its due row, by wheel key and by task id.
        self.pending = PendingTasks(TimingWheel(tick_ms=config.tick_ms, start_ms=clock.now_ms()), TASK_RECORD_SLOTS)
        self.wheel = self.pending.wheel
        # Everything with due_ms below this is in the wheel, fired, or superseded, except while
        # a slice is being read and admitted: then from loading_from_ms on it may not be yet.
        self.loaded_until_ms = 0
        self._loading_from_ms: int | None = None
        # Tasks forgotten while a slice is read: the read may have found them before their end
        # was written, and its copies must not come back into the wheel after the forget.
        self._forgotten_while_loading: set[str] = set()
        # Fired batches dispatch has not confirmed: batch id -> (lowest due_ms, count).
        self._unconfirmed: dict[int, tuple[int, int]] = {}
        self._unconfirmed_count = 0
        self._next_batch = 1
        self._waiter: asyncio.Future | None = None
        self._waiting_until = 0
        self._tasks: list[asyncio.Task] = []
        self._push_tasks: set[asyncio.Future] = set()  # pushes in flight
        self.fired = 0
        self.lag_ms = 0
        self.checkpoint_ms = 0

    def _shard_of(self, task_id: str) -> int:
        return shard_of(task_id, self._num_shards)

    @property
    def shards(self) -> frozenset[int]:
        return frozenset(self._shards)

    def offer(self, records: list[TaskRecord]) -> list[TaskRecord]:
        """Admits the records due inside the loaded window; the rest the loader will read.
        Returns the records of shards this timer does not hold, for their owner."""
        return self._offer(records)[1]

    def forget(self, task_ids: Sequence[str]) -> None:
        """Drops the pending timers of ended or cancelled tasks."""
        self._forget(task_ids)

    def _offer(self, records: list[TaskRecord]) -> tuple[int, list[TaskRecord]]:
        limit = self.loaded_until_ms
        held = self._shards
        taken = [r for r in records if r.due_ms < limit and r.shard in held]
        if taken:
            self._admit(taken)
        return len(taken), [r for r in records if r.shard not in held]

    def _forget(self, task_ids: Sequence[str]) -> int:
        if self._loading_from_ms is not None:
            self._forgotten_while_loading.update(task_ids)
        return self.pending.forget(task_ids)

    def _admit(self, records, skip: set[str] | None = None) -> None:
        """Schedules records, except those in ``skip``; a task already held moves only for a
        newer gen."""
        earliest = self.pending.admit(records, skip)
        if earliest is None:
            return
        if self._waiter is not None and earliest < self._waiting_until and not self._waiter.done():
            self._waiter.set_result(None)

    def checkpoint(self, now: int, margin_ms: int | None = None) -> int:
        """Lowest due time that may still need firing after a crash, of any shard held, at
        least ``margin_ms`` (by default checkpoint_margin_ms) behind the clock."""
        margin = self._config.checkpoint_margin_ms if margin_ms is None else margin_ms
        candidates = [self.loaded_until_ms, now - margin]
        if self._loading_from_ms is not None:
            candidates.append(self._loading_from_ms)
        next_deadline = self.wheel.next_deadline()
        if next_deadline is not None:
            candidates.append(next_deadline)
        candidates.extend(low for low, _ in self._unconfirmed.values())
        return min(candidates)

    # -- the shards held (the ShardOwner calls these: taskwheel.cluster.shards.ShardHolder) --------

    def held_checkpoints(self, now_ms: int) -> dict[int, int]:
        cp = self.checkpoint(now_ms)
        self.checkpoint_ms = max(self.checkpoint_ms, cp)
        return self._per_shard(cp)

    def _per_shard(self, cp: int) -> dict[int, int]:
        """``cp`` for each shard held, or lower where a take is still loading the shard."""
        return {shard: min(cp, self._catching_up.get(shard, cp)) for shard in self._shards}

    def fire_until(self, ms: int) -> None:
        self._fire_until = ms
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, leases: list[ShardLease], suspect_until: dict[int, int]) -> None:
        """Holds these shards from now on: offers of them are taken, the loader reads them, and
        what lies between each one's checkpoint and the loaded window is read here, a minute
        bucket at a time, into the wheel (overdue rows fire at once)."""
        until = self.loaded_until_ms
        start = {lease.shard: lease.checkpoint_ms for lease in leases}
        # Before any row of them can fire.
        self._suspect_until.update(suspect_until)
        for lease in leases:
            self._epochs[lease.shard] = lease.epoch
        for shard, checkpoint in start.items():
            self._shards.add(shard)
            self._swept_until[shard] = checkpoint
            if checkpoint < until:
                self._catching_up[shard] = checkpoint
        try:
            while self._catching_up.keys() & start.keys():
                shards = sorted(self._catching_up.keys() & start.keys())
                lows = {shard: self._catching_up[shard] for shard in shards}
                end = min(until, (min(lows.values()) // 60_000 + 1) * 60_000)
                while len(self.wheel) >= self._config.max_wheel:
                    await self._clock.sleep(0.05)
                results = await asyncio.gather(*(self._store.load_due(shard, lows[shard], end)
                                                 for shard in shards if lows[shard] < end))
                for records in results:
                    records = [r for r in records if r.shard in self._shards]
                    for i in range(0, len(records), ADMIT_CHUNK):
                        self._admit(records[i:i + ADMIT_CHUNK])
                        await asyncio.sleep(0)
                for shard in shards:
                    if end >= until or shard not in self._shards:
                        self._catching_up.pop(shard, None)
                    elif lows[shard] < end:
                        self._catching_up[shard] = end
        except BaseException:
            # Not held after all: the ShardOwner's next round finds them free again.
            self.lose(set(start))
            raise

    def lose(self, shards: set[int]) -> None:
        """Stops firing these shards at once; their timers leave the wheel."""
        self._drop(shards)

    async def give_up(self, shards: set[int]) -> dict[int, int] | None:
        """Stops firing these shards, waits (up to DRAIN_MS) until what was fired of them is
        leased or held, and returns their checkpoints: below each one's unfired tasks and below
        any slice not yet read for it. None when the wait ran out: a delivery may not be
        durable yet, so the shards cannot be handed over cleanly (their leases must lapse, and
        the next owner flag what it fires again)."""
        now = self._clock.now_ms()
        floor = min(self.loaded_until_ms, now - self._config.checkpoint_margin_ms)
        if self._loading_from_ms is not None:
            floor = min(floor, self._loading_from_ms)
        checkpoints = {shard: min(floor, self._catching_up.get(shard, floor)) for shard in shards}
        for shard, low in self._drop(shards).items():
            checkpoints[shard] = min(checkpoints[shard], low)
        batches = set(self._unconfirmed)
        for _ in range(DRAIN_MS // 10):
            if not batches & self._unconfirmed.keys():
                return checkpoints
            await self._clock.sleep(0.01)
        log.warning("%d fired batches still not leased or held after %d ms: leaving %d shards to lapse",
                    len(batches & self._unconfirmed.keys()), DRAIN_MS, len(shards))
        return None

    def _drop(self, shards: set[int]) -> dict[int, int]:
        """Takes these shards out of the wheel and the held set; returns each one's lowest due
        time that was in the wheel."""
        self._shards -= shards
        for shard in shards:
            self._catching_up.pop(shard, None)
            self._suspect_until.pop(shard, None)
            self._swept_until.pop(shard, None)
            self._epochs.pop(shard, None)
        dropped = [r for r in self.pending.records() if r.shard in shards]
        self.pending.forget([r.task_id for r in dropped])
        lows: dict[int, int] = {}
        for r in dropped:
            if r.due_ms < lows.get(r.shard, r.due_ms + 1):
                lows[r.shard] = r.due_ms
        return lows

    def status(self) -> timer_pb2.TimerStatus:
        nd = self.wheel.next_deadline()
        return timer_pb2.TimerStatus(
            pending=len(self.wheel),
            loaded_until_ms=self.loaded_until_ms,
            checkpoint_ms=self.checkpoint_ms,
            fired=self.fired,
            lag_ms=self.lag_ms,
            next_deadline_ms=nd if nd is not None else 0,
            shards=len(self._shards),
            fire_until_ms=self._fire_until,
        )

    # -- loops --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the loops. No shard is held until the ShardOwner's ``take``; the loaded
        window starts at the clock, and each shard taken loads up to it from its checkpoint."""
        self.loaded_until_ms = self.checkpoint_ms = self._clock.now_ms()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._load_loop(), name="timer-load"),
            loop.create_task(self._fire_loop(), name="timer-fire"),
            loop.create_task(self._sweep_loop(), name="timer-sweep"),
        ]

    async def stop(self) -> None:
        """Stops the loops. The ShardOwner has handed the shards over before (saving their
        checkpoints); anything still held is left to its lease."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        # Pushes in flight finish (their leases become durable) or are abandoned to the
        # checkpoint, which still lies below them.
        if self._push_tasks:
            await asyncio.wait(list(self._push_tasks), timeout=2)

    async def _load_once(self) -> bool:
        """Reads the next slice once the window needs it. True when it read something.

        Slices are whole and aligned (``slice_ms``), read when the loaded window has shrunk to
        ``lookahead_ms - slice_ms``: one read per shard per slice, never a trickle of small
        reads (each read costs a walk of its bucket's index in the embedded store).
        """
        now = self._clock.now_ms()
        slice_ms = self._config.slice_ms
        start = self.loaded_until_ms
        shards = sorted(self._shards)
        if start >= now + self._config.lookahead_ms - slice_ms or len(self.wheel) >= self._config.max_wheel:
            return False
        if start < now - slice_ms:
            # Catching up after downtime: the rest of the minute bucket, in one read per shard.
            end = (start // 60_000 + 1) * 60_000
        else:
            end = (start // slice_ms + 1) * slice_ms
        # Raised before reading, so that offers arriving during the read are taken; the read's
        # copies of them are then dropped by gen, and its copies of tasks forgotten meanwhile
        # (cancelled or ended: a forget is always final) are dropped by name. Until the slice is
        # all in the wheel, the checkpoint stays at its start.
        self.loaded_until_ms = end
        self._loading_from_ms = start
        span = telemetry.tracer.start_span("timer.load") if telemetry.enabled else None
        try:
            results = await asyncio.gather(
                *(self._store.load_due(s, start, end) for s in shards)
            )
            # In chunks, letting the fire loop run between them: the slice is due a lookahead
            # from now, the tasks firing meanwhile are not. A shard given up meanwhile is not.
            forgotten = self._forgotten_while_loading
            for shard, records in zip(shards, results):
                for i in range(0, len(records), ADMIT_CHUNK):
                    if shard not in self._shards:
                        break
                    self._admit(records[i:i + ADMIT_CHUNK], forgotten)
                    await asyncio.sleep(0)
        except BaseException:  # cancelled too: a stop mid-slice must not checkpoint past it
            self.loaded_until_ms = min(self.loaded_until_ms, start)
            raise
        finally:
            self._loading_from_ms = None
            self._forgotten_while_loading.clear()
            if span is not None:
                span.end()
        return True

    async def _load_loop(self) -> None:
        # A failed read is tried again after 50 ms, doubling to 2 s; a success starts the waits over.
        load_once = tenacity.AsyncRetrying(
            wait=tenacity.wait_exponential(multiplier=0.05, max=2.0),
            sleep=self._clock.sleep,
            before_sleep=lambda attempt: log.warning("loading due tasks failed, retrying in %.2fs: %s",
                                                     attempt.next_action.sleep, attempt.outcome.exception()))
        while True:
            if not await load_once(self._load_once):
                await self._clock.sleep(min(0.1, self._config.slice_ms / 4000))

    async def _sweep_loop(self) -> None:
        while True:
            await self._clock.sleep(SWEEP_EVERY_MS / 1000)
            # Rows due before a suspect time were all read by the take that set it, and fired.
            done = self._clock.now_ms() - 60_000
            for shard in [s for s, until in self._suspect_until.items() if until < done]:
                del self._suspect_until[shard]
            if self.sweeping:
                try:
                    await self.sweep()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("sweeping below the checkpoints failed: %s", exc)

    async def sweep(self) -> int:
        """Reads each held shard from where the last sweep stopped up to its checkpoint, and
        fires the live rows found there (see the module docstring); returns how many."""
        checkpoints = self._per_shard(self.checkpoint(self._clock.now_ms(), margin_ms=SWEEP_LAG_MS))
        ranges = {shard: (self._swept_until.get(shard, cp), cp) for shard, cp in checkpoints.items()}
        ranges = {shard: (lo, hi) for shard, (lo, hi) in ranges.items() if lo < hi}
        if not ranges:
            return 0
        shards = sorted(ranges)
        results = await asyncio.gather(*(self._store.load_due(s, *ranges[s]) for s in shards))
        found = 0
        for shard, records in zip(shards, results):
            if shard not in self._shards:
                continue
            self._swept_until[shard] = ranges[shard][1]
            if records:
                found += len(records)
                self._admit(records)
        if found:
            self.swept += found
            log.warning("found %d tasks below the checkpoints that were never loaded (an offer lost "
                        "with the node that accepted them); firing them now", found)
        return found

    async def _fire_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wheel = self.wheel
        pending = self.pending
        turn_started = self._clock.now_ms()
        while True:
            now = self._clock.now_ms()
            nd = wheel.next_deadline()
            # Too much fired and not confirmed, or the shards' leases not renewed in time.
            paused = self._unconfirmed_count >= self._config.max_unconfirmed or now >= self._fire_until
            if nd is None or nd > now or paused:
                wait_ms = 50 if nd is None or paused else min(50, nd - now)
                self._waiting_until = now + wait_ms if not paused else 0
                waiter = self._waiter = loop.create_future()
                handle = self._clock.call_later(wait_ms / 1000, _wake, waiter)
                await waiter
                handle.cancel()
                self._waiter = None
                turn_started = self._clock.now_ms()
                continue
            if now - turn_started >= FIRE_TURN_MS:
                await asyncio.sleep(0)  # to the back of the loop's queue, once
                turn_started = self._clock.now_ms()
                continue
            fired = pending.fire(now)
            if not fired:
                continue
            self.lag_ms = now - fired[0].due_ms
            self.fired += len(fired)
            self._mark(fired)
            if telemetry.enabled:
                _trace_fire(fired, now)
            self._hand_over(fired, now)

    def _mark(self, fired: list[TaskRecord]) -> None:
        """What each firing carries to the worker: the epoch of its shard's lease, and whether
        the row may have fired under the shard's previous owner already."""
        epochs = self._epochs
        for r in fired:
            r.owner_epoch = epochs.get(r.shard, 0)
        suspect = self._suspect_until
        if suspect:
            for r in fired:
                if r.due_ms < suspect.get(r.shard, 0):
                    r.redelivered = True

    def _hand_over(self, fired: list[TaskRecord], fired_at: int) -> None:
        batch = self._next_batch
        self._next_batch += 1
        self._unconfirmed[batch] = (fired[0].due_ms, len(fired))
        self._unconfirmed_count += len(fired)
        try:
            handed = self._dispatch.hand_over(fired, fired_at)
        except Exception as exc:
            log.warning("handing over %d fired tasks failed, retrying: %s", len(fired), exc)
            self._retry_later(batch, fired, fired_at)
            return
        handed.add_done_callback(functools.partial(self._handed, batch, fired, fired_at))
        self._push_tasks.add(handed)

    def _handed(self, batch: int, fired: list[TaskRecord], fired_at: int, handed: asyncio.Future) -> None:
        self._push_tasks.discard(handed)
        if not handed.cancelled() and handed.exception() is not None:
            log.warning("handing over %d fired tasks failed, retrying: %s", len(fired), handed.exception())
            self._retry_later(batch, fired, fired_at)  # the batch stays unconfirmed meanwhile
            return
        self._confirmed(batch)

    def _confirmed(self, batch: int) -> None:
        _, count = self._unconfirmed.pop(batch)
        self._unconfirmed_count -= count

    def _retry_later(self, batch: int, fired: list[TaskRecord], fired_at: int) -> None:
        task = asyncio.get_running_loop().create_task(self._retry_hand_over(batch, fired, fired_at))
        self._push_tasks.add(task)
        task.add_done_callback(self._push_tasks.discard)

    async def _retry_hand_over(self, batch: int, fired: list[TaskRecord], fired_at: int) -> None:
        # Dispatch down or restarting: the batch stays unconfirmed while the hand-over that just
        # failed is tried again after 50 ms, then after waits doubling to 2 s.
        async def hand_over() -> None:  # a coroutine function: tenacity would not await a Future
            await self._dispatch.hand_over(fired, fired_at)

        # The failed hand-over may have delivered some of them (a remote dispatch that died
        # before answering): the next delivery says it may be a repeat.
        for r in fired:
            r.redelivered = True

        try:
            await self._clock.sleep(0.05)
            await tenacity.AsyncRetrying(
                wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
                sleep=self._clock.sleep,
                before_sleep=lambda attempt: log.warning("handing over %d fired tasks failed, retrying: %s",
                                                         len(fired), attempt.outcome.exception()))(hand_over)
        finally:
            self._confirmed(batch)


def _trace_fire(fired: list[TaskRecord], now: int) -> None:
    """One span per fired batch, linked to the traces of (up to 128 of) its tasks."""
    links = [link for link in (telemetry.link_from_traceparent(r.traceparent) for r in fired[:128]) if link]
    span = telemetry.tracer.start_span("timer.fire", links=links, attributes={
        "taskwheel.tasks": len(fired), "taskwheel.lag_ms": now - fired[0].due_ms})
    span.end()


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
