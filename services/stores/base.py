"""The store interface every taskwheel store implements, and the records it speaks in.

Layout every store follows (so that the embedded and the Cassandra store behave the same):

* **Due rows**, partitioned by ``(shard, minute bucket of due_ms)`` (Cassandra orders each by
  ``(due_ms, task_id)``, the embedded store by arrival). A due row is written once, when a
  task gets a new due time (accepted, leased, retried), and never updated; it carries
  everything a delivery needs, so a timer loads a time slice of a partition without a lookup
  per task. Old buckets expire (TTL / cleanup).
* **Task rows** by ``task_id``: the current ``gen``, state, attempt and due time. ``Get``,
  ``Cancel`` and the transitions use them.
* A due row is *live* when its ``gen`` equals the task's current gen and the task is not in a
  terminal state. ``load_due`` returns live rows only. Stores record supersession beside the
  bucket (or consult the task row) instead of deleting due rows, so that reads never scan past
  deletes.
* **Checkpoints** per shard: the timer's promise that every live row with ``due_ms`` below it
  has been handed over (its successor row is durable). A restarted timer resumes loading there.
  Before any checkpoint is saved, ``load_checkpoint`` returns the time the store was created, so
  no task ever accepted can lie before it.

Every method is a coroutine and takes or returns batches. Stores raise ``StoreUnavailable`` when
the backend cannot be reached (ingest maps it to UNAVAILABLE) and never acknowledge a write that
is not durable.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Mapping, Sequence

from taskwheel.task import TaskRecord, TaskState


@dataclass(slots=True)
class InsertOutcome:
    task_id: str
    # True when (queue, idempotency_key) matched an earlier task: task_id is that task's and
    # nothing new was stored.
    duplicate: bool = False


class TransitionKind(enum.IntEnum):
    # Delivered: state LEASED, gen+1, a new due row at due_ms = lease expiry carrying attempt =
    # the next attempt. If no ack comes, that row fires as the redelivery.
    LEASE = 1
    # Nacked with attempts left: state SCHEDULED, gen+1, a new due row at due_ms.
    RETRY = 2
    SUCCEED = 3
    FAIL = 4


@dataclass(slots=True)
class Transition:
    """A change to one task, applied only if the task is still at ``expected_gen`` and not
    terminal; otherwise it is ignored and reported False (the task moved on: acked elsewhere,
    cancelled, or already rescheduled)."""

    task_id: str
    shard: int
    kind: TransitionKind
    expected_gen: int
    old_due_ms: int  # due_ms of the expected gen's row (locates it for supersession)
    due_ms: int = 0  # LEASE / RETRY: the new row's due time
    attempt: int = 0  # LEASE / RETRY: the new row's attempt
    error: str = ""  # RETRY / FAIL: becomes last_error
    # LEASE / RETRY: the task itself, so the new due row is self-contained without a read.
    task: TaskRecord | None = None


class StoreUnavailable(Exception):
    """The backend cannot be reached or refused the write; nothing was acknowledged."""


class AlreadyEnded(Exception):
    """Cancel of a task that already reached a terminal state."""

    def __init__(self, record: TaskRecord):
        super().__init__(f"task {record.task_id} already ended as {record.state.name}")
        self.record = record


class Store(abc.ABC):
    """What the services need from durable storage. Implementations: SqliteStore, CassandraStore."""

    #: Human-readable kind and location, e.g. "sqlite:/var/lib/taskwheel/tasks.db".
    description: str = ""
    #: Fixed when the store is created; due rows are partitioned by it.
    num_shards: int = 16
    #: How many independent ``insert`` calls are worth running at once: 1 for a store with one
    #: writer (SQLite), more for a latency-bound networked one (Cassandra).
    insert_concurrency: int = 1
    #: How many ``apply`` calls a caller may have running at once and still have them applied
    #: in the order it made them: more than 1 only for a store that runs its writes one at a
    #: time in arrival order (SQLite's writer thread), so the next batch can wait at the
    #: writer while one is applied, instead of a round trip of the caller's event loop later.
    ordered_apply_depth: int = 1

    @abc.abstractmethod
    async def open(self) -> None:
        """Connects and creates the schema when missing. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flushes and releases resources. Idempotent."""

    @abc.abstractmethod
    async def insert(self, tasks: Sequence[TaskRecord]) -> list[InsertOutcome]:
        """Stores new tasks (state SCHEDULED, gen 1) durably, one outcome per task in order.

        A task whose (queue, idempotency_key) is already taken is not stored; its outcome names
        the earlier task and says duplicate. Two tasks of one call with the same key: the first
        wins. Returns only once every stored task survives a crash of this process.
        """

    @abc.abstractmethod
    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's by-id row, or None."""

    @abc.abstractmethod
    async def cancel(self, task_id: str, now_ms: int) -> TaskRecord | None:
        """Moves a non-terminal task to CANCELLED and returns it; None when unknown;
        raises AlreadyEnded for a terminal one."""

    @abc.abstractmethod
    async def load_due(self, shard: int, from_ms: int, to_ms: int) -> list[TaskRecord]:
        """Live due rows of ``shard`` with from_ms <= due_ms < to_ms, in no particular order
        (the timer's wheel orders them).

        The range may span several buckets. Each returned record carries the due row's gen,
        due_ms and attempt, and the task's current state."""

    @abc.abstractmethod
    async def apply(self, transitions: Sequence[Transition], now_ms: int) -> list[bool]:
        """Applies transitions durably, in order; True for each one applied."""

    @abc.abstractmethod
    async def load_checkpoint(self, shard: int) -> int:
        """The shard's saved checkpoint, or the store's creation time when none is saved."""

    @abc.abstractmethod
    async def save_checkpoints(self, checkpoints: Mapping[int, int]) -> None:
        """Saves {shard: ms}. A checkpoint never moves backwards: a lower value is ignored."""

    @abc.abstractmethod
    async def counts(self) -> dict[TaskState, int]:
        """Number of tasks in each state (may be approximate for large Cassandra stores)."""
