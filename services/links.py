"""How the services reach each other: one small interface per link, implemented once in
process (the other service itself) and once across processes (a gRPC client here).

* ``TimerLink``: what ingest and dispatch tell the timer. TimerService implements it in one
  process; RemoteTimer speaks the internal Timer service.
* ``DispatchLink``: how the timer hands fired tasks to dispatch. DispatchService implements it
  in one process; RemoteDispatch speaks the internal Dispatch service.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, Sequence

import grpc

from taskwheel import telemetry
from taskwheel.clock import now_ms
from taskwheel.internal.v1 import dispatch_pb2, dispatch_pb2_grpc, timer_pb2, timer_pb2_grpc
from taskwheel.task import TaskRecord
from taskwheel.wire import due_message

log = logging.getLogger("taskwheel.links")

# Offers and forgets are retried this long: past it the checkpoint margin has the task covered
# for a timer restart, and a live timer has long loaded it (or never will: see docs/design.md).
_RETRY_FOR_S = 20.0


class TimerLink(Protocol):
    def offer(self, records: list[TaskRecord]) -> None:
        """Tasks just made durable: the timer keeps those due inside its loaded window (the
        loader reads the rest from the store). Never waits; an offer lost only makes a task
        later, never lost."""

    def forget(self, task_ids: Sequence[str]) -> None:
        """Tasks ended or cancelled: their pending timers go. Never waits."""


class DispatchLink(Protocol):
    def hand_over(self, records: list[TaskRecord], fired_at_ms: int) -> asyncio.Future[None]:
        """Fired tasks, in firing order. The future resolves once each is leased to a worker
        or held, durably; on an error the timer hands them over again."""


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.keepalive_time_ms", 10_000),
        ],
        interceptors=telemetry.client_interceptors(),
    )


class RemoteTimer:
    """The timer of another process."""

    def __init__(self, target: str, lookahead_ms: int) -> None:
        self._stub = timer_pb2_grpc.TimerStub(channel(target))
        self._horizon_ms = lookahead_ms + 1_000
        self._inflight: set[asyncio.Task] = set()

    def offer(self, records: list[TaskRecord]) -> None:
        limit = now_ms() + self._horizon_ms
        soon = [r for r in records if r.due_ms < limit]
        if soon:
            self._background(self._stub.Offer, timer_pb2.OfferRequest(tasks=[due_message(r) for r in soon]))

    def forget(self, task_ids: Sequence[str]) -> None:
        self._background(self._stub.Forget, timer_pb2.ForgetRequest(task_ids=list(task_ids)))

    def _background(self, rpc, request) -> None:
        task = asyncio.get_running_loop().create_task(_retrying(rpc, request))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)


class RemoteDispatch:
    """Dispatch of another process."""

    def __init__(self, target: str) -> None:
        self._stub = dispatch_pb2_grpc.DispatchStub(channel(target))

    def hand_over(self, records: list[TaskRecord], fired_at_ms: int) -> asyncio.Future[None]:
        request = dispatch_pb2.PushRequest(tasks=[due_message(r) for r in records], fired_at_ms=fired_at_ms)
        return asyncio.ensure_future(self._push(request))

    async def _push(self, request: dispatch_pb2.PushRequest) -> None:
        # No deadline: Push answers when the tasks are leased or held; the timer retries on error.
        await self._stub.Push(request, wait_for_ready=True)


async def _retrying(rpc, request) -> None:
    # A loop rather than tenacity, which would add a measurable share to the CPU of every offer
    # and forget; gRPC's own retry policy counts attempts, not time, under one deadline for all.
    deadline = time.monotonic() + _RETRY_FOR_S
    backoff = 0.05
    while True:
        try:
            await rpc(request, timeout=5, wait_for_ready=True)
            return
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() + backoff > deadline:
                log.warning("giving up on %s after %.0fs: %s", type(request).__name__, _RETRY_FOR_S, exc.details())
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
