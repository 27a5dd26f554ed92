"""How the services reach each other: one small interface per link, implemented in process
by the other service itself, and across the cluster by a router (taskwheel.cluster.routing)
that sends each task to the node that should have it, over the internal gRPC services.

* ``TimerLink``: what ingest and dispatch tell the timer. TimerService implements it for its
  own shards; TimerRouter for every shard, wherever its owner runs.
* ``DispatchLink``: how the timer hands fired tasks to dispatch. DispatchService implements it
  for its own workers; DispatchRouter for workers anywhere in the cluster.
"""
from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

import grpc

from taskwheel import telemetry
from taskwheel.task import TaskRecord


class TimerLink(Protocol):
    def offer(self, records: list[TaskRecord]) -> object:
        """Tasks just made durable: the timer keeps those due inside its loaded window (the
        loader reads the rest from the store). Never waits; an offer lost only makes a task
        later, never lost. (TimerService returns the records of shards it does not hold.)"""

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
