"""Dispatch's transition writer, and the hand-overs it confirms to the timer once durable.

Every change dispatch makes to a task (a lease, a retry, a hold, an ack's end) is a store
transition, and all of them go through one FIFO group commit, so a task's ack is never applied
before its lease. Once a write is durable, the next due rows it made are offered to the timer
and the fired tasks it settled are confirmed to the timer's hand-over.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable

from taskwheel.config import Config
from taskwheel.core import untrack, untrack_list
from taskwheel.dispatch.finished import MS_BITS, FinishedMemory
from taskwheel.group_commit import GroupCommit
from taskwheel.links import TimerLink
from taskwheel.stores.base import Store, Transition
from taskwheel.task import TaskRecord, untracked

log = logging.getLogger("taskwheel.dispatch")


class HandOver:
    """One batch of fired tasks the timer handed over: its future resolves once each task is
    leased to a worker or held, durably (``done`` counts them)."""

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


def confirm(hand_overs: list[list[HandOver]]) -> None:
    """One ``done`` per task of each list; one call per run of the same hand-over, since a
    write's tasks mostly come from one."""
    last = None
    count = 0
    for batches in hand_overs:
        for batch in batches:
            if batch is last:
                count += 1
                continue
            if last is not None:
                last.done(count)
            last, count = batch, 1
    if last is not None:
        last.done(count)


class TransitionWriter:
    """Writes transitions in arrival order; then offers their next due rows and confirms."""

    def __init__(self, config: Config, store: Store, finished: FinishedMemory, now_ms: Callable[[], int]) -> None:
        self._store = store
        self._finished = finished
        self._now_ms = now_ms
        self.timer: TimerLink | None = None  # set by start
        # In order: a task's ack must not overtake its lease. A store that applies one call at a
        # time in arrival order (ordered_apply_depth > 1) takes the next batch while one runs.
        self._commit = GroupCommit(self._apply, max_batch=config.write_batch, max_pending=1 << 62,
                                   concurrency=store.ordered_apply_depth,
                                   overlap_at=config.write_batch // 2,
                                   linger_s=config.transition_linger_ms / 1000)

    @property
    def pending(self) -> int:
        """Transitions queued or being written."""
        return self._commit.pending

    def start(self, timer: TimerLink) -> None:
        self.timer = timer
        self._commit.start()

    async def stop(self) -> None:
        await self._commit.stop()

    def write(self, transitions: list[Transition], successors: list[TaskRecord] | None,
              hand_overs: list[list[HandOver]]) -> None:
        """Queues transitions. Once durable, each applied transition's successor record
        (``successors`` lines up with ``transitions``; None: none has one) goes to the timer,
        and every hand-over in ``hand_overs`` (lists of them) counts one task per appearance."""
        fut = self._commit.commit(transitions)
        # Out of the cyclic GC's view while they wait: when the writer falls behind, a second
        # of acks waits, and each young collection would walk them all. A transition holds
        # strings, numbers, a kind and an untracked record; a list of hand-overs holds
        # HandOver objects, whose futures lead only to the long-lived services: neither can be
        # in a garbage cycle, so reference counting frees them.
        untrack(transitions, Transition)
        # The lists of hand-overs are shared by a take's Fired (leases.take_fired) and never
        # changed in place: that, not untrack_list's check, is what keeps them safe out of view.
        untrack(hand_overs, list)
        untrack_list(transitions)
        untrack_list(hand_overs)
        if successors is not None:
            untracked(successors)  # offered to the timer once written: held until due
        fut.add_done_callback(functools.partial(self._written, successors, hand_overs))

    def _written(self, successors: list[TaskRecord] | None, hand_overs: list[list[HandOver]],
                 fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("store rejected %s; the checkpoint keeps the tasks for a restart", exc)
            return
        if hand_overs:
            confirm(hand_overs)
        if successors is not None and self.timer is not None:
            # Not the rows of tasks answered while their write was queued: forgotten already,
            # offered now they would sit in the wheel until they fire (a lease: 30 s).
            finished = self._finished
            offers = [row for applied, row in zip(fut.result(), successors)
                      if applied and (finished.get(row.task_id) >> MS_BITS) < row.gen]
            if offers:
                self.timer.offer(offers)

    async def _apply(self, transitions: list[Transition]) -> list[bool]:
        untrack_list(transitions)  # the group's batch, of untracked transitions (see write)
        return await self._store.apply(transitions, self._now_ms())
