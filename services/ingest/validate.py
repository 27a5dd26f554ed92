"""Turns TaskSpecs into TaskRecords, or into error messages that name the field."""
from __future__ import annotations

import os
import re
from typing import Sequence

from taskwheel.config import Limits
from taskwheel.core import shards_of
from taskwheel.task import TaskRecord, untracked

_QUEUE = re.compile(r"[A-Za-z0-9._:\-]+")
# Queue names that matched _QUEUE, so most tasks skip the regex (the length limit is checked
# each time: it is per-service); cleared when it grows past the bound.
_valid_queues: dict[str, None] = {}
_VALID_QUEUES_MAX = 4096


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
        return self.take(now_ms, 1)[0]

    def take(self, now_ms: int, count: int) -> list[str]:
        """``count`` ids for tasks accepted at ``now_ms``."""
        head = f"{now_ms & 0xFFFFFFFFFFFF:012x}{self._prefix}"
        first = self._counter + 1
        self._counter = (self._counter + count) & 0xFFFFFFFF
        return [f"{head}{n & 0xFFFFFFFF:08x}" for n in range(first, first + count)]


class SpecError(ValueError):
    """A task the server will not accept; the message names the field."""


def ms_rounded_up(nanos: int) -> int:
    """Whole milliseconds of ``nanos`` (0 <= nanos < 1e9), rounded up: a time kept in
    milliseconds is never earlier than the one asked for, and a duration never shorter."""
    return -(-nanos // 1_000_000)


def records_of_specs(
    specs: Sequence, ids: TaskIds, num_shards: int, now: int, limits: Limits, traceparent: str = ""
) -> tuple[list[TaskRecord], list[int], list[tuple[int, str]]]:
    """Validates a Submit's taskwheel.v1.TaskSpecs: the records of the valid ones with their
    positions in ``specs``, and (position, message) for each invalid one."""
    task_ids = ids.take(now, len(specs))
    shards = shards_of(task_ids, num_shards)
    records: list[TaskRecord] = []
    positions: list[int] = []
    errors: list[tuple[int, str]] = []
    for i, spec in enumerate(specs):
        try:
            record = record_of_spec(spec, task_ids[i], shards[i], now, limits)
        except SpecError as exc:
            errors.append((i, f"tasks[{i}]: {exc}"))
            continue
        if traceparent:
            record.traceparent = traceparent
        records.append(record)
        positions.append(i)
    return untracked(records), positions, errors


def record_of_spec(spec, task_id: str, shard: int, now: int, limits: Limits) -> TaskRecord:
    """Validates one taskwheel.v1.TaskSpec. Raises SpecError."""
    queue = spec.queue
    if queue not in _valid_queues or len(queue) > limits.max_queue_len:
        if not queue:
            raise SpecError("queue is required")
        if len(queue) > limits.max_queue_len or not _QUEUE.fullmatch(queue):
            raise SpecError(
                f"queue {queue[:40]!r} must be 1-{limits.max_queue_len} characters of [A-Za-z0-9._:-]"
            )
        if len(_valid_queues) >= _VALID_QUEUES_MAX:
            _valid_queues.clear()
        _valid_queues[queue] = None
    if len(spec.payload) > limits.max_payload_bytes:
        raise SpecError(
            f"payload is {len(spec.payload)} bytes, over the limit of {limits.max_payload_bytes}"
        )
    when = spec.WhichOneof("when")
    if when == "fire_at":
        ts = spec.fire_at
        if ts.nanos < 0 or ts.nanos >= 1_000_000_000:
            raise SpecError("fire_at.nanos must be in [0, 1e9)")
        fire_at = ts.seconds * 1000 + ms_rounded_up(ts.nanos)
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
        if d.seconds < 0 or d.nanos < 0:
            raise SpecError("delay must not be negative")
        delay_ms = d.seconds * 1000 + ms_rounded_up(d.nanos)
        if delay_ms > limits.max_future_ms:
            raise SpecError(f"delay is over the limit of {limits.max_future_ms // 86_400_000} days")
        fire_at = now + delay_ms
    else:
        fire_at = now
    max_attempts = spec.max_attempts or limits.default_max_attempts
    if max_attempts > limits.max_attempts:
        raise SpecError(f"max_attempts {max_attempts} is over the limit of {limits.max_attempts}")
    headers = dict(spec.headers) if spec.headers else {}
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
    lease = spec.lease
    if lease.seconds or lease.nanos:  # a zero lease is the default, as an absent one
        if lease.seconds < 0 or lease.nanos < 0:
            raise SpecError("lease must not be negative")
        lease_ms = lease.seconds * 1000 + ms_rounded_up(lease.nanos)
        if not limits.min_lease_ms <= lease_ms <= limits.max_lease_ms:
            raise SpecError(
                f"lease must be between {limits.min_lease_ms} ms and {limits.max_lease_ms} ms"
            )
    return TaskRecord(
        task_id=task_id, shard=shard, queue=queue, payload=spec.payload, fire_at_ms=fire_at,
        due_ms=fire_at if fire_at > now else now, max_attempts=max_attempts, headers=headers,
        idempotency_key=key, lease_ms=lease_ms, created_ms=now, updated_ms=now,
    )
