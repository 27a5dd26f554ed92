"""A task as taskwheel stores, fires and delivers it: the one declaration of its fields.

Every place that lists a task's fields derives the list from ``TaskRecord`` here: the embedded
store's column lists and the Cassandra store's statements (in their field order), the compiled
loops' slot offsets (``TASK_RECORD_SLOTS``, by name), and the conversions to and from the
internal ``DueTask`` message (every field marked ``in_due_task`` travels in it, by its name).
The schema files (the stores' .sql and .cql) spell the columns out, as migrations must; a test
checks they hold exactly these fields. Adding a field is one line here, its column in each
schema with the migration that adds it, and, if a delivery needs it, its ``DueTask`` field.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from taskwheel.core import RecordShape, untrack, untrack_list


class TaskState(enum.IntEnum):
    """Same numbers as taskwheel.v1.TaskState."""

    SCHEDULED = 1
    LEASED = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Column:
    """How a field is stored and carried."""

    sql: str  # the embedded store's column type
    cql: str  # Cassandra's
    in_due_task: bool  # carried from the timer to dispatch in the internal DueTask message


def _column(sql: str, cql: str, *, in_due_task: bool = True, **default: Any) -> Any:
    return field(metadata={"column": Column(sql, cql, in_due_task)}, **default)


def _firing(**default: Any) -> Any:
    """A field of one firing of a task, set by the timer that fired it: never stored, carried
    to dispatch in DueTask and to the worker in its Delivery."""
    return field(metadata={"firing": True}, **default)


@dataclass(slots=True)
class TaskRecord:
    """A task as stored: its by-id row, and equally its current due row."""

    task_id: str = _column("TEXT", "text")
    shard: int = _column("INTEGER", "int", in_due_task=False)  # derived from task_id
    queue: str = _column("TEXT", "text")
    payload: bytes = _column("BLOB", "blob")
    fire_at_ms: int = _column("INTEGER", "bigint")  # what the client asked for (delay resolved)
    # When the current gen is due: max(fire_at, accepted), a lease expiry, a retry.
    due_ms: int = _column("INTEGER", "bigint")
    state: TaskState = _column("INTEGER", "tinyint", in_due_task=False, default=TaskState.SCHEDULED)
    attempt: int = _column("INTEGER", "int", default=1)  # the attempt the current gen delivers
    max_attempts: int = _column("INTEGER", "int", default=3)
    gen: int = _column("INTEGER", "int", default=1)
    headers: dict[str, str] = _column("TEXT", "frozen<map<text, text>>", default_factory=dict)
    idempotency_key: str = _column("TEXT", "text", in_due_task=False, default="")
    lease_ms: int = _column("INTEGER", "bigint", default=30_000)
    traceparent: str = _column("TEXT", "text", default="")
    created_ms: int = _column("INTEGER", "bigint", in_due_task=False, default=0)
    updated_ms: int = _column("INTEGER", "bigint", in_due_task=False, default=0)
    last_error: str = _column("TEXT", "text", in_due_task=False, default="")
    # The epoch of the shard's lease under which its timer fired it (0: not fired yet).
    owner_epoch: int = _firing(default=0)
    # The firing may repeat an earlier delivery: a lease that ran out, or a row fired again by
    # a new owner of its shard that the previous one did not hand over.
    redelivered: bool = _firing(default=False)


# The stored fields (the columns), and the fields of a firing with what a record starts with.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TaskRecord) if "column" in f.metadata)
COLUMNS: dict[str, Column] = {f.name: f.metadata["column"] for f in dataclasses.fields(TaskRecord)
                              if "column" in f.metadata}
FIRING: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TaskRecord) if "firing" in f.metadata}
# The fields a fired task carries to dispatch (DueTask), in declaration order.
DUE_TASK_FIELDS: tuple[str, ...] = tuple(name for name in FIELDS if COLUMNS[name].in_due_task) + tuple(FIRING)

# For the compiled loops that read or build records: a TaskRecord's fields are read from their
# slots (one load each) instead of by getattr from C (a generic lookup each).
TASK_RECORD_SLOTS = RecordShape(TaskRecord, FIELDS + tuple(FIRING))


def untracked(records: list[TaskRecord]) -> list[TaskRecord]:
    """``records``, taken out of the cyclic GC's view, and the list too when it holds nothing
    else: a record cannot be part of a reference cycle, and records held for seconds ahead of
    their due time would make up most of what each young collection scans
    (taskwheel.core.records). For lists of records the hot path keeps."""
    untrack(records, TaskRecord)
    untrack_list(records)
    return records


def accepted(now_ms: int, traceparent: str = "") -> TaskRecord:
    """A new task's record as accepted at ``now_ms``: what the tasks of one Submit share, with
    the task's own fields still to fill in (ingest's readers do)."""
    return TaskRecord(task_id="", shard=0, queue="", payload=b"", fire_at_ms=now_ms, due_ms=now_ms,
                      traceparent=traceparent, created_ms=now_ms, updated_ms=now_ms)


def successor(rec: TaskRecord, gen: int, due_ms: int, attempt: int, state: TaskState,
              last_error: str) -> TaskRecord:
    """``rec`` at its next due row: a copy of every field (from C), with these five changed."""
    nxt = TASK_RECORD_SLOTS.copy(rec)
    nxt.gen = gen
    nxt.due_ms = due_ms
    nxt.attempt = attempt
    nxt.state = state
    nxt.last_error = last_error
    return nxt
