"""Conversions between the store's TaskRecord and the taskwheel.v1 messages."""
from __future__ import annotations

from taskwheel.stores.base import TaskRecord, TaskState
from taskwheel.v1 import task_pb2, timer_pb2


def set_ms(ts, ms: int) -> None:
    """Fills a google.protobuf.Timestamp from unix milliseconds (floor semantics for negatives)."""
    ts.seconds, rem = divmod(ms, 1000)
    ts.nanos = rem * 1_000_000


def ms_of(ts) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def due_message(rec: TaskRecord) -> timer_pb2.DueTask:
    return timer_pb2.DueTask(
        task_id=rec.task_id,
        gen=rec.gen,
        due_ms=rec.due_ms,
        fire_at_ms=rec.fire_at_ms,
        queue=rec.queue,
        payload=rec.payload,
        attempt=rec.attempt,
        max_attempts=rec.max_attempts,
        headers=rec.headers,
        traceparent=rec.traceparent,
        lease_ms=rec.lease_ms,
    )


def record_of_due(msg: timer_pb2.DueTask, shard_of) -> TaskRecord:
    return TaskRecord(
        task_id=msg.task_id,
        shard=shard_of(msg.task_id),
        queue=msg.queue,
        payload=msg.payload,
        fire_at_ms=msg.fire_at_ms,
        due_ms=msg.due_ms,
        attempt=msg.attempt,
        max_attempts=msg.max_attempts,
        gen=msg.gen,
        headers=dict(msg.headers),
        lease_ms=msg.lease_ms,
        traceparent=msg.traceparent,
    )


def task_message(rec: TaskRecord) -> task_pb2.Task:
    task = task_pb2.Task(
        task_id=rec.task_id,
        queue=rec.queue,
        payload=rec.payload,
        state=int(rec.state),
        # A LEASED task's row carries its lease row's attempt (the redelivery's); the
        # contract reports the delivery in progress.
        attempt=rec.attempt - 1 if rec.state == TaskState.LEASED and rec.attempt > 1 else rec.attempt,
        max_attempts=rec.max_attempts,
        headers=rec.headers,
        idempotency_key=rec.idempotency_key,
        last_error=rec.last_error,
    )
    set_ms(task.fire_at, rec.fire_at_ms)
    set_ms(task.due_at, rec.due_ms)
    set_ms(task.created_at, rec.created_ms)
    set_ms(task.updated_at, rec.updated_ms or rec.created_ms)
    task.lease.seconds, rem = divmod(rec.lease_ms, 1000)
    task.lease.nanos = rem * 1_000_000
    return task


def state_name(state: int) -> str:
    return TaskState(state).name.lower()
