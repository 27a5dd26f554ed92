"""How one service reaches another when they run in separate processes.

In one process the services hold each other directly (TimerService.offer, DispatchService.push);
across processes they hold these, which speak the Timer and Dispatch gRPC services.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from taskwheel import telemetry
from taskwheel.clock import now_ms
from taskwheel.task import TaskRecord
from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc, timer_pb2, timer_pb2_grpc
from taskwheel.wire import due_message

log = logging.getLogger("taskwheel.links")

# Offers and forgets are retried this long: past it the checkpoint margin has the task covered
# for a timer restart, and a live timer has long loaded it (or never will: see docs/design.md).
_RETRY_FOR_S = 20.0


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
    """The timer as ingest and dispatch see it across processes."""

    def __init__(self, target: str, lookahead_ms: int) -> None:
        self._stub = timer_pb2_grpc.TimerStub(channel(target))
        self._horizon_ms = lookahead_ms + 1_000
        self._inflight: set[asyncio.Task] = set()

    async def offer(self, records: list[TaskRecord]) -> None:
        limit = now_ms() + self._horizon_ms
        soon = [r for r in records if r.due_ms < limit]
        if soon:
            request = timer_pb2.OfferRequest(tasks=[due_message(r) for r in soon])
            self._background(self._stub.Offer, request)

    async def forget(self, task_ids) -> None:
        self._background(self._stub.Forget, timer_pb2.ForgetRequest(task_ids=list(task_ids)))

    def _background(self, rpc, request) -> None:
        task = asyncio.get_running_loop().create_task(_retrying(rpc, request))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)


class RemoteDispatch:
    """Dispatch as the timer sees it across processes."""

    def __init__(self, target: str) -> None:
        self._stub = dispatch_pb2_grpc.DispatchStub(channel(target))

    async def push(self, records: list[TaskRecord], fired_at_ms: int) -> None:
        # No deadline: Push answers when the tasks are leased or held; the timer retries on error.
        await self._stub.Push(
            dispatch_pb2.PushRequest(tasks=[due_message(r) for r in records], fired_at_ms=fired_at_ms),
            wait_for_ready=True,
        )


async def _retrying(rpc, request) -> None:
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
