"""Turns a TaskSpec into a TaskRecord, or into an error message that names the field."""
from __future__ import annotations

import os
import re

from taskwheel.config import Limits
from taskwheel.stores.base import TaskRecord

_QUEUE = re.compile(r"[A-Za-z0-9._:\-]+")


class TaskIds:
    """Unique, roughly time-ordered task ids without a syscall per task.

    28 hex digits: 12 of the accepting clock's milliseconds, 8 of a random per-process prefix,
    8 of a counter. Two processes collide only if they draw the same 32-bit prefix and reach the
    same counter in the same millisecond.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = int.from_bytes(os.urandom(4), "big")

    def next(self, now_ms: int) -> str:
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return f"{now_ms & 0xFFFFFFFFFFFF:012x}{self._prefix}{self._counter:08x}"


class SpecError(ValueError):
    """A task the server will not accept; the message names the field."""


def record_of_spec(spec, task_id: str, shard: int, now: int, limits: Limits) -> TaskRecord:
    """Validates one taskwheel.v1.TaskSpec. Raises SpecError."""
    queue = spec.queue
    if not queue:
        raise SpecError("queue is required")
    if len(queue) > limits.max_queue_len or not _QUEUE.fullmatch(queue):
        raise SpecError(
            f"queue {queue[:40]!r} must be 1-{limits.max_queue_len} characters of [A-Za-z0-9._:-]"
        )
    if len(spec.payload) > limits.max_payload_bytes:
        raise SpecError(
            f"payload is {len(spec.payload)} bytes, over the limit of {limits.max_payload_bytes}"
        )
    when = spec.WhichOneof("when")
    if when == "fire_at":
        ts = spec.fire_at
        if ts.nanos < 0 or ts.nanos >= 1_000_000_000:
            raise SpecError("fire_at.nanos must be in [0, 1e9)")
        fire_at = ts.seconds * 1000 + ts.nanos // 1_000_000
        if fire_at > now + limits.max_future_ms:
            raise SpecError(
                f"fire_at is {(fire_at - now) // 86_400_000} days ahead; the limit is "
                f"{limits.max_future_ms // 86_400_000} days"
            )
        if fire_at < now - limits.max_past_ms:
            raise SpecError(
                f"fire_at is {(now - fire_at) // 1000} s in the past; at most "
                f"{limits.max_past_ms // 1000} s is accepted (it then fires at once)"
            )
    elif when == "delay":
        d = spec.delay
        delay_ms = d.seconds * 1000 + d.nanos // 1_000_000
        if delay_ms < 0:
            raise SpecError("delay must not be negative")
        if delay_ms > limits.max_future_ms:
            raise SpecError(f"delay is over the limit of {limits.max_future_ms // 86_400_000} days")
        fire_at = now + delay_ms
    else:
        fire_at = now
    max_attempts = spec.max_attempts or limits.default_max_attempts
    if max_attempts > limits.max_attempts:
        raise SpecError(f"max_attempts {max_attempts} is over the limit of {limits.max_attempts}")
    headers = dict(spec.headers)
    if headers:
        if len(headers) > limits.max_headers:
            raise SpecError(f"{len(headers)} headers, over the limit of {limits.max_headers}")
        size = sum(len(k) + len(v) for k, v in headers.items())
        if size > limits.max_header_bytes:
            raise SpecError(f"headers total {size} bytes, over the limit of {limits.max_header_bytes}")
    key = spec.idempotency_key
    if len(key) > limits.max_idempotency_key_len:
        raise SpecError(f"idempotency_key is over {limits.max_idempotency_key_len} characters")
    lease_ms = limits.default_lease_ms
    if spec.HasField("lease"):
        lease_ms = spec.lease.seconds * 1000 + spec.lease.nanos // 1_000_000
        if not limits.min_lease_ms <= lease_ms <= limits.max_lease_ms:
            raise SpecError(
                f"lease must be between {limits.min_lease_ms} ms and {limits.max_lease_ms} ms"
            )
    return TaskRecord(
        task_id=task_id,
        shard=shard,
        queue=queue,
        payload=spec.payload,
        fire_at_ms=fire_at,
        due_ms=fire_at if fire_at > now else now,
        max_attempts=max_attempts,
        headers=headers,
        idempotency_key=key,
        lease_ms=lease_ms,
        created_ms=now,
        updated_ms=now,
    )
