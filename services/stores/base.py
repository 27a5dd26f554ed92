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
* **Shard leases**, one row per shard: which node owns the shard (``owner``, empty when none
  does), the ``epoch`` of that ownership (raised by every acquisition, so it is higher than
  every earlier one), when the owner's lease runs out, and the shard's **checkpoint**: the
  owner's promise that every live row with ``due_ms`` below it has been handed over (its
  successor row is durable). A new owner, or a restarted one, loads from there. Before any
  checkpoint is saved it is the time the store was created, so no task ever accepted can lie
  before it. Every change to a lease row is conditional on the owner and epoch the caller
  read (a lightweight transaction on Cassandra), so a node that lost a shard without knowing
  it cannot move the shard's checkpoint or lease.
* **Members**: the nodes alive now, each with its address and the queues its workers consume,
  kept by a heartbeat that lapses (``members`` lists the ones not lapsed).

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


@dataclass(slots=True, frozen=True)
class ShardLease:
    """One shard's lease row as read."""

    shard: int
    owner: str  # the node id holding the shard; "" when none does (never owned, or released)
    epoch: int  # raised by every acquisition; 0 before the first
    expires_ms: int  # the owner's lease runs out at this wall-clock time; 0 once released
    checkpoint_ms: int

    def lapsed(self, now_ms: int) -> bool:
        """True when nobody holds the shard: released, never owned, or its lease ran out."""
        return not self.owner or self.expires_ms <= now_ms


@dataclass(slots=True, frozen=True)
class Member:
    """A live node, as its last heartbeat described it."""

    node_id: str
    address: str  # host:port of its gRPC services
    # What it runs: "timer" (it owns shards), "dispatch" (workers may connect), "ingest".
    roles: frozenset[str]
    queues: frozenset[str]  # the queues its workers consume now
    started_ms: int
    expires_ms: int  # its heartbeat lapses at this wall-clock time


class StoreUnavailable(Exception):
    """The backend cannot be reached, or cannot reach enough replicas: nothing was acknowledged.

    ``maybe_applied``: a write may have reached the store anyway (it timed out after the store
    began it); without it, the write certainly left nothing a reader could act on.
    ``retry_after_ms``: when a retry is worth trying."""

    def __init__(self, message: str, *, maybe_applied: bool = False, retry_after_ms: int = 1000):
        super().__init__(message)
        self.maybe_applied = maybe_applied
        self.retry_after_ms = retry_after_ms


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

    async def load_checkpoint(self, shard: int) -> int:
        """The shard's saved checkpoint, or the store's creation time when none is saved."""
        self._check_shard(shard)
        return (await self.shard_leases())[shard].checkpoint_ms

    # ---- shard leases and members (see the module's docstring) -------------------------------

    @abc.abstractmethod
    async def shard_leases(self) -> list[ShardLease]:
        """Every shard's lease, in shard order, as of now: a read that sees every change to a
        lease acknowledged before it began (Cassandra reads them at the serial level)."""

    @abc.abstractmethod
    async def acquire_shards(self, node_id: str, seen: Sequence[ShardLease], expires_ms: int) -> list[ShardLease]:
        """Takes each shard of ``seen`` whose lease is still exactly as seen (same owner and
        epoch): ``node_id`` becomes its owner at epoch + 1, its lease running to expires_ms, its
        checkpoint unchanged. Returns the leases taken; a shard someone else changed meanwhile
        is left alone. The caller decides what is free to take."""

    @abc.abstractmethod
    async def renew_shards(self, node_id: str, held: Mapping[int, tuple[int, int]], expires_ms: int) -> set[int]:
        """For each ``{shard: (epoch, checkpoint_ms)}`` still owned by node_id at that epoch:
        its lease now runs to expires_ms and its checkpoint becomes checkpoint_ms (the owner
        never lowers it). Returns the shards no longer held at that epoch: nothing of theirs
        was written."""

    @abc.abstractmethod
    async def release_shards(self, node_id: str, held: Mapping[int, tuple[int, int]]) -> set[int]:
        """Gives up each ``{shard: (epoch, checkpoint_ms)}`` still owned by node_id at that
        epoch, saving its checkpoint: no owner, the epoch kept. Returns the shards released
        (the others had been taken over already and are left alone)."""

    @abc.abstractmethod
    async def heartbeat(self, member: Member) -> None:
        """Writes or refreshes a member's row; it lapses at member.expires_ms."""

    @abc.abstractmethod
    async def members(self, now_ms: int) -> list[Member]:
        """The members whose heartbeat has not lapsed at now_ms, by node id."""

    @abc.abstractmethod
    async def leave(self, node_id: str) -> None:
        """Removes a member's row (a node that stops cleanly)."""

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is outside 0..{self.num_shards - 1}")

    @abc.abstractmethod
    async def counts(self) -> dict[TaskState, int]:
        """Number of tasks in each state (may be approximate for large Cassandra stores)."""
