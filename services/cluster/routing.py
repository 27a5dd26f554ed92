"""Where a task goes in the cluster, from this node's view (taskwheel.cluster.shards.View).

* ``TimerRouter`` (a TimerLink, what ingest and dispatch tell timers): an offer or a forget goes
  to the timer holding the task's shard, in process when that is this node, else over the
  internal Timer service. A timer that no longer holds a shard says so; its tasks are offered
  again to the owner of the next view, for up to ``RETRY_FOR_MS``. An offer that never lands
  only makes the task later: it is durable, and the owner's loader reads it when its slice
  comes, or from the checkpoint when the shard moves again.
* ``DispatchRouter`` (a DispatchLink, where the timer hands fired tasks): a task whose queue has
  a worker on this node, or on no node, is handed to this node's dispatch; one whose queue's
  workers are all on other nodes is pushed to one of them (internal Dispatch service), so a
  worker connected to any one node receives its queue's tasks from every shard. A push that
  fails hands the tasks to this node's dispatch instead, where they wait (held) for a worker.
  Tasks that waited here because no node had a worker for their queue are pushed on as soon
  as the view shows one elsewhere.
"""
from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Callable, Sequence

import grpc

from taskwheel.clock import SYSTEM_CLOCK, Clock
from taskwheel.cluster.shards import View
from taskwheel.core import shard_of
from taskwheel.internal.v1 import dispatch_pb2, dispatch_pb2_grpc, timer_pb2, timer_pb2_grpc
from taskwheel.links import channel
from taskwheel.task import TaskRecord
from taskwheel.wire import due_message

log = logging.getLogger("taskwheel.cluster")

# How long an offer or forget is retried, through view changes and failed calls.
RETRY_FOR_MS = 20_000


class _Peers:
    """Stubs to the other nodes, by address, made once each."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class TimerRouter:
    """Offers and forgets to the timers holding the tasks' shards (a TimerLink)."""

    def __init__(self, num_shards: int, node_id: str, local=None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._num_shards = num_shards
        self._node_id = node_id
        self._local = local  # this node's TimerService, when it runs one
        self._clock = clock
        self._view = View()
        self._owns_all = False  # this node holds every shard (one node): no per-task routing
        self._peers = _Peers()
        self._view_changed = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self.rerouted = 0
        self.given_up = 0

    def update(self, view: View) -> None:
        self._view = view
        self._owns_all = bool(view.owners) and all(owner == self._node_id for owner in view.owners)
        self._view_changed.set()
        self._view_changed = asyncio.Event()

    async def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        await self._peers.close()

    # -- TimerLink ------------------------------------------------------------------------------

    def offer(self, records: list[TaskRecord]) -> None:
        left = self._send_offers(records)
        if left:
            self._background(self._offer_later(left, self._clock.now_ms() + RETRY_FOR_MS))

    def forget(self, task_ids: Sequence[str]) -> None:
        left = self._send_forgets(list(task_ids))
        if left:
            self._background(self._forget_later(left, self._clock.now_ms() + RETRY_FOR_MS))

    # -- routing --------------------------------------------------------------------------------

    def _owners(self, shards: Sequence[int]) -> list[str]:
        owners = self._view.owners
        return [owners[s] if s < len(owners) else "" for s in shards]

    def _send_offers(self, records: list[TaskRecord]) -> list[TaskRecord]:
        """Sends each record to its shard's owner; returns those with no owner to go to now.
        Records refused by the owner come back through ``_offer_later``."""
        local = self._local
        return self._route(records, lambda: [r.shard for r in records],
                           local.offer if local is not None else None, self._remote_offer)

    def _route(self, items: list, shards: Callable[[], list[int]], here, there) -> list:
        """Sends each item to its shard's owner: ``here(group)`` for this node's own (it returns
        what it did not take), ``there(address, group)`` in the background for another's.
        ``shards()`` gives each item's shard, asked only when the items are to be split.
        Returns the items with no owner in the view, to try again later."""
        if here is not None and self._owns_all:
            return list(here(items) or ())  # one node: no per-task work on the submit path
        owners = self._owners(shards())
        if here is not None and all(o == self._node_id for o in owners):
            return list(here(items) or ())  # this node's own shards only
        by_owner: dict[str, list] = {}
        for owner, item in zip(owners, items):
            by_owner.setdefault(owner, []).append(item)
        left = by_owner.pop("", [])
        for owner, group in by_owner.items():
            member = self._view.members.get(owner)
            if owner == self._node_id and here is not None:
                left.extend(here(group) or ())
            elif member is None:
                left.extend(group)
            else:
                self._background(there(member.address, group))
        return left

    async def _remote_offer(self, address: str, records: list[TaskRecord]) -> None:
        stub = timer_pb2_grpc.TimerStub(self._peers.channel(address))
        try:
            response = await stub.Offer(timer_pb2.OfferRequest(tasks=[due_message(r) for r in records]), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.debug("offer to %s failed: %s", address, exc.details())
            left = records
        else:
            not_held = set(response.not_held)
            left = [r for r in records if r.shard in not_held]
        if left:
            await self._offer_later(left, self._clock.now_ms() + RETRY_FOR_MS)

    async def _offer_later(self, records: list[TaskRecord], deadline: int) -> None:
        while records:
            if self._clock.now_ms() >= deadline:
                self.given_up += len(records)
                log.warning("gave up offering %d tasks after %d ms: their owner's loader reads them",
                            len(records), RETRY_FOR_MS)
                return
            await self._next_view()
            self.rerouted += len(records)
            records = self._send_offers(records)

    def _send_forgets(self, task_ids: list[str]) -> list[str]:
        local = self._local

        def here(group: list[str]) -> list[str]:
            local.forget(group)
            return []

        return self._route(task_ids, lambda: [shard_of(t, self._num_shards) for t in task_ids],
                           here if local is not None else None, self._remote_forget)

    async def _remote_forget(self, address: str, task_ids: list[str]) -> None:
        stub = timer_pb2_grpc.TimerStub(self._peers.channel(address))
        try:
            await stub.Forget(timer_pb2.ForgetRequest(task_ids=task_ids), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.debug("forget to %s failed: %s", address, exc.details())
            await self._forget_later(task_ids, self._clock.now_ms() + RETRY_FOR_MS)

    async def _forget_later(self, task_ids: list[str], deadline: int) -> None:
        # A forget that never lands leaves a timer that fires into dispatch's memory of finished
        # tasks, or at a row that is no longer live: a wasted fire, never a delivery.
        while task_ids and self._clock.now_ms() < deadline:
            await self._next_view()
            task_ids = self._send_forgets(task_ids)

    async def _next_view(self) -> None:
        changed = self._view_changed
        try:
            await asyncio.wait_for(changed.wait(), timeout=2.0)
        except asyncio.TimeoutError:
            pass

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)


class DispatchRouter:
    """Fired tasks to a dispatch with a worker for their queue (a DispatchLink for the timer)."""

    def __init__(self, node_id: str, local=None) -> None:
        self._node_id = node_id
        self._local = local  # this node's DispatchService, when it runs one
        self._view = View()
        self._peers = _Peers()
        # queue -> addresses of other nodes whose workers consume it
        self._elsewhere: dict[str, list[str]] = {}
        self._dispatchers: list[str] = []  # addresses of other nodes running dispatch
        self._inflight: set[asyncio.Task] = set()
        self.pushed = 0

    def update(self, view: View) -> None:
        self._view = view
        elsewhere: dict[str, list[str]] = {}
        dispatchers = []
        for member in view.members.values():
            if member.node_id == self._node_id or "dispatch" not in member.roles:
                continue
            dispatchers.append(member.address)
            for queue in member.queues:
                elsewhere.setdefault(queue, []).append(member.address)
        self._elsewhere = elsewhere
        self._dispatchers = sorted(dispatchers)
        local = self._local
        if local is not None:
            for queue, targets in elsewhere.items():
                waiting = local.take_back(queue)
                if waiting:
                    task = asyncio.get_running_loop().create_task(self._push_waiting(targets, waiting))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)

    async def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        await self._peers.close()

    async def _push_waiting(self, targets: list[str], waiting: list) -> None:
        """Tasks that waited here for a worker go to nodes that have one; their hand-overs to
        this node are confirmed once they are leased or held there (or here again)."""
        by_target: dict[str, list] = {}
        for fired in waiting:
            address = targets[zlib.crc32(fired.record.task_id.encode()) % len(targets)]
            by_target.setdefault(address, []).append(fired)
        await asyncio.gather(*(self._push([f.record for f in group], group[0].fired_at, address)
                               for address, group in by_target.items()), return_exceptions=True)
        for fired in waiting:
            for batch in fired.batches:
                batch.done_one()

    def hand_over(self, records: list[TaskRecord], fired_at_ms: int) -> asyncio.Future[None]:
        local = self._local
        elsewhere = self._elsewhere
        if local is not None and not elsewhere:
            return local.hand_over(records, fired_at_ms)  # one node, or no worker elsewhere
        here: list[TaskRecord] = []
        away: dict[str, list[TaskRecord]] = {}
        queues = local.queues() if local is not None else {}
        for r in records:
            targets = elsewhere.get(r.queue)
            qs = queues.get(r.queue)
            if local is not None and (not targets or (qs is not None and qs.consumers)):
                here.append(r)
            else:
                targets = targets or self._dispatchers
                if not targets:
                    here.append(r)
                    continue
                address = targets[zlib.crc32(r.task_id.encode()) % len(targets)]
                away.setdefault(address, []).append(r)
        parts = [asyncio.ensure_future(self._push(group, fired_at_ms, address)) for address, group in away.items()]
        if here:
            if local is None:
                raise RuntimeError("no dispatch to hand fired tasks to: none runs in the cluster")
            parts.append(local.hand_over(here, fired_at_ms))
        return asyncio.ensure_future(_all(parts))

    async def _push(self, records: list[TaskRecord], fired_at_ms: int, address: str) -> None:
        stub = dispatch_pb2_grpc.DispatchStub(self._peers.channel(address))
        request = dispatch_pb2.PushRequest(tasks=[due_message(r) for r in records], fired_at_ms=fired_at_ms)
        try:
            # Push answers once the tasks are leased or held there, durably.
            await stub.Push(request, timeout=30)
            self.pushed += len(records)
        except grpc.aio.AioRpcError as exc:
            if self._local is None:
                raise
            log.warning("pushing %d fired tasks to %s failed, keeping them here: %s", len(records), address,
                        exc.details())
            # It may have delivered some before it failed: what this node delivers now says so.
            for r in records:
                r.redelivered = True
            await self._local.hand_over(records, fired_at_ms)


async def _all(parts: list[asyncio.Future]) -> None:
    results = await asyncio.gather(*parts, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
