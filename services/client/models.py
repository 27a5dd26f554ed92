"""The client's view of taskwheel.v1 messages: plain Python values in, plain Python values out.

Times: ``fire_at`` takes a ``datetime`` or unix epoch seconds (int or float). A naive datetime
means local time, as ``datetime.timestamp()`` reads it; times coming back are aware, in UTC.
Durations (``delay``, ``lease``) take seconds or a ``timedelta``.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Union

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from taskwheel.client.errors import status_code
from taskwheel.v1 import ingest_pb2, task_pb2

__all__ = ["TaskSpec", "SubmitResult", "Task", "TaskState", "Stats", "Delivery",
           "spec_message", "FireAt", "Seconds"]

FireAt = Union[datetime, int, float]
Seconds = Union[int, float, timedelta]


class TaskState(enum.IntEnum):
    """Where a task is in its life: taskwheel.v1.TaskState, its numbers taken from the contract
    (the client imports nothing of the server, whose own enum has the same numbers)."""

    SCHEDULED = task_pb2.TASK_STATE_SCHEDULED
    LEASED = task_pb2.TASK_STATE_LEASED
    SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
    FAILED = task_pb2.TASK_STATE_FAILED
    CANCELLED = task_pb2.TASK_STATE_CANCELLED


@dataclass(slots=True)
class TaskSpec:
    """One task for ``submit_many``; the fields mean what ``Client.submit``'s arguments mean."""

    queue: str
    payload: bytes | str = b""
    fire_at: FireAt | None = None
    delay: Seconds | None = None
    idempotency_key: str = ""
    max_attempts: int = 0
    headers: Mapping[str, str] | None = None
    lease: Seconds | None = None

    def to_message(self) -> task_pb2.TaskSpec:
        return spec_message(self.queue, self.payload, fire_at=self.fire_at, delay=self.delay,
                            idempotency_key=self.idempotency_key,
                            max_attempts=self.max_attempts, headers=self.headers,
                            lease=self.lease)


def _set_timestamp(ts: timestamp_pb2.Timestamp, when: FireAt) -> None:
    if isinstance(when, datetime):
        # Whole seconds through timestamp() (local time for naive values), exact microseconds.
        ts.seconds = int(when.replace(microsecond=0).timestamp())
        ts.nanos = when.microsecond * 1000
        return
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise TypeError(f"fire_at: expected datetime or epoch seconds, got {type(when).__name__}")
    if isinstance(when, int):
        ts.seconds, ts.nanos = when, 0
        return
    if not math.isfinite(when):
        raise ValueError(f"fire_at: {when!r} is not a time")
    whole = math.floor(when)
    ts.seconds, ts.nanos = whole, min(999_999_999, round((when - whole) * 1e9))


def _set_duration(d: duration_pb2.Duration, value: Seconds, name: str) -> None:
    if isinstance(value, timedelta):
        nanos = (value.days * 86_400 + value.seconds) * 1_000_000_000 + value.microseconds * 1000
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name}: {value!r} is not a duration")
        nanos = round(value * 1e9)
    else:
        raise TypeError(f"{name}: expected seconds or timedelta, got {type(value).__name__}")
    # Duration wants seconds and nanos of the same sign.
    seconds, rest = divmod(abs(nanos), 1_000_000_000)
    if nanos < 0:
        seconds, rest = -seconds, -rest
    d.seconds, d.nanos = seconds, rest


def spec_message(queue: str, payload: bytes | str, *, fire_at: FireAt | None = None,
                 delay: Seconds | None = None, idempotency_key: str = "",
                 max_attempts: int = 0, headers: Mapping[str, str] | None = None,
                 lease: Seconds | None = None) -> task_pb2.TaskSpec:
    """The taskwheel.v1.TaskSpec for these arguments. Neither fire_at nor delay means now."""
    if fire_at is not None and delay is not None:
        raise ValueError("fire_at and delay are exclusive: give at most one")
    if isinstance(payload, str):
        payload = payload.encode()
    msg = task_pb2.TaskSpec(queue=queue, payload=payload)
    if idempotency_key:
        msg.idempotency_key = idempotency_key
    if max_attempts:
        msg.max_attempts = max_attempts
    if headers:
        msg.headers.update(headers)
    if fire_at is not None:
        _set_timestamp(msg.fire_at, fire_at)
    elif delay is not None:
        _set_duration(msg.delay, delay, "delay")
    if lease is not None:
        _set_duration(msg.lease, lease, "lease")
    return msg


def _ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def _datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds, timezone.utc) + timedelta(
        microseconds=ts.nanos // 1000)


def _optional_datetime(msg: Any, name: str) -> datetime | None:
    return _datetime(getattr(msg, name)) if msg.HasField(name) else None


class SubmitResult:
    """The outcome of one task of a submit: a task_id, or a status code and a message."""

    __slots__ = ("index", "task_id", "code", "error", "duplicate", "fire_at_ms")

    def __init__(self, index: int, task_id: str, code: grpc.StatusCode, error: str,
                 duplicate: bool, fire_at_ms: int | None):
        self.index = index
        self.task_id = task_id
        self.code = code
        self.error = error
        self.duplicate = duplicate
        self.fire_at_ms = fire_at_ms

    @classmethod
    def from_message(cls, index: int, msg: ingest_pb2.SubmitResult) -> "SubmitResult":
        return cls(index, msg.task_id, status_code(msg.code), msg.error, msg.duplicate,
                   _ms(msg.fire_at) if msg.HasField("fire_at") else None)

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def fire_at(self) -> datetime | None:
        if self.fire_at_ms is None:
            return None
        return datetime.fromtimestamp(self.fire_at_ms / 1000, timezone.utc)

    def __repr__(self) -> str:
        if self.ok:
            dup = ", duplicate" if self.duplicate else ""
            return f"SubmitResult(#{self.index} {self.task_id}{dup})"
        return f"SubmitResult(#{self.index} {self.code.name}: {self.error})"


def _state(number: int) -> TaskState:
    try:
        return TaskState(number)
    except ValueError:  # TASK_STATE_UNSPECIFIED, or a state newer than this client
        return number  # type: ignore[return-value]


@dataclass(slots=True)
class Task:
    """A stored task and where it is in its life (see taskwheel.v1.Task)."""

    task_id: str
    queue: str
    payload: bytes
    state: TaskState
    attempt: int
    max_attempts: int
    fire_at: datetime | None
    due_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    last_error: str = ""
    lease: timedelta | None = None

    @classmethod
    def from_message(cls, msg: task_pb2.Task) -> "Task":
        return cls(
            task_id=msg.task_id,
            queue=msg.queue,
            payload=msg.payload,
            state=_state(msg.state),
            attempt=msg.attempt,
            max_attempts=msg.max_attempts,
            fire_at=_optional_datetime(msg, "fire_at"),
            due_at=_optional_datetime(msg, "due_at"),
            created_at=_optional_datetime(msg, "created_at"),
            updated_at=_optional_datetime(msg, "updated_at"),
            headers=dict(msg.headers),
            idempotency_key=msg.idempotency_key,
            last_error=msg.last_error,
            lease=msg.lease.ToTimedelta() if msg.HasField("lease") else None,
        )


@dataclass(slots=True)
class Stats:
    """Task counts by state, as ingest's store sees them."""

    scheduled: int
    leased: int
    succeeded: int
    failed: int
    cancelled: int
    store: str

    @classmethod
    def from_message(cls, msg: ingest_pb2.StatsResponse) -> "Stats":
        return cls(msg.scheduled, msg.leased, msg.succeeded, msg.failed, msg.cancelled,
                   msg.store)


class Delivery:
    """One fired task handed to a worker's handler. ``message`` is the taskwheel.v1.Delivery."""

    __slots__ = ("message", "task_id", "delivery_id", "queue", "payload", "attempt",
                 "max_attempts", "headers", "traceparent", "redelivered", "owner_epoch")

    def __init__(self, message: task_pb2.Delivery):
        self.message = message
        self.task_id = message.task_id
        self.delivery_id = message.delivery_id
        self.queue = message.queue
        self.payload = message.payload
        self.attempt = message.attempt
        self.max_attempts = message.max_attempts
        self.headers = dict(message.headers)
        self.traceparent = message.traceparent
        # May repeat an earlier delivery of this task (see taskwheel.v1.Delivery.redelivered).
        self.redelivered = message.redelivered
        self.owner_epoch = message.owner_epoch

    @property
    def fire_at(self) -> datetime | None:
        return _optional_datetime(self.message, "fire_at")

    @property
    def fire_at_ms(self) -> int:
        """The fire time in unix milliseconds (0 when unset): cheap, for lateness figures."""
        return _ms(self.message.fire_at)

    @property
    def fired_at(self) -> datetime | None:
        return _optional_datetime(self.message, "fired_at")

    @property
    def lease_expires_at(self) -> datetime | None:
        return _optional_datetime(self.message, "lease_expires_at")

    @property
    def last_attempt(self) -> bool:
        """True when a failure now ends the task FAILED."""
        return self.max_attempts > 0 and self.attempt >= self.max_attempts

    def __repr__(self) -> str:
        return (f"Delivery({self.task_id} attempt {self.attempt}/{self.max_attempts} "
                f"on {self.queue})")
