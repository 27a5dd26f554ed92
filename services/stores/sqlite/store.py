"""The embedded store: one SQLite file in WAL mode, laid out the way the Cassandra store is.

The package's files: schema.sql (the tables), migrations.py (older files upgraded to it),
columns.py (the task columns, derived from TaskRecord's declaration), queries.py (every
statement), threads.py (the checkpointer and the store's threads), rows.pyx (load_due's
compiled reader), and this file, the Store.

Tables (see base.py for the semantics every store shares):

``due``          one row per (task, gen): shard, minute bucket, due_ms, gen and the task's
                 rowid; the rest of a delivery is read from the task row, which a due row
                 must match anyway to be live (so a task's payload is written once, not again
                 per due row as the Cassandra store must). Written once, never updated. Its
                 primary key ``(shard, bucket, task_rowid, gen)`` clusters it by the Cassandra
                 partition (shard, bucket), one B-tree with no separate index; within a
                 partition rows sit in task order, which is arrival order for new tasks, and
                 ``load_due`` returns them in that order (the timer's wheel orders them). Why
                 not cluster by due_ms as Cassandra does: in a B-tree that makes every insert
                 land on a random page, and SQLite writes each touched page to the WAL on
                 commit; appending at the tail of each active partition makes inserts about
                 2.5x cheaper, while a read stays one range per bucket. Why not by second, so
                 that a one-second slice skips nothing: 16 shards x 3,000 seconds of a
                 50-minute spread are 48,000 tails instead of 800, too many pages to keep hot:
                 inserts (on the writer thread, which bounds submits) would cost a third more,
                 for a read 30-50 % cheaper on the reader's.
``due_far``      the due rows of new tasks due at or after the first far bucket (5 minutes of
                 due times, every shard's) that starts PROMOTE_LEAD_MS or more ahead, keyed by
                 (far bucket, task rowid, gen): insertion order within a far bucket, so tasks
                 due over an hour are appended at 12 points instead of scattered over 16 x 60
                 partition tails, about one dirtied page per task in a batch of 1,000: such
                 tasks cost the writer half the time and a quarter of the bytes they cost in
                 ``due``, as little as tasks due within two minutes. The promoter
                 (``promote``) moves a far bucket into ``due`` once it starts less than
                 PROMOTE_LEAD_MS ahead, in chunks of insertion order, each sorted by ``due``'s
                 key so it is written as runs. ``load_due`` reads both tables in one
                 statement, one snapshot, and a chunk moves in one transaction, so a read sees
                 each row once, promoted or not.
``tasks``        by task_id (unique index): current gen, state, attempt, due_ms, the spec and
                 the bookkeeping: TaskRecord's fields (taskwheel.task). A due row is live when
                 ``tasks.gen`` equals its gen, the state is SCHEDULED or LEASED and the task
                 has not ended; ``load_due`` joins on that (through the due row's
                 ``task_rowid``) instead of deleting superseded rows. Time-ordered task ids
                 keep this index append-only too.
``ended``        (due_ms, task rowid) -> final state, updated_ms, last_error, for tasks ended
                 by a SUCCEED or FAIL: a narrow row instead of rewriting the wide task row.
                 Tasks end in fire order, which is random against insert order, so each
                 rewrite would dirty a page of ``tasks`` of its own; a narrow row halves the
                 cost of an ack. Keyed by the due time of the row the task ended at (its task
                 row's due_ms, never updated after), so acks land at the tail of the B-tree;
                 keyed by rowid, each would land on a page of its own, and an ack would cost
                 twice as much. Readers take a task's state, updated_ms and last_error from
                 here when present.
``tasks_idem``   unique (queue, idempotency_key), partial: tasks without a key cost nothing.
``checkpoints``  shard -> ms, only ever raised.
``shard_leases`` shard -> owner, epoch, expires_ms; a row appears at a shard's first
                 acquisition and stays (its epoch must only grow). A renewal changes it and
                 the checkpoint in one transaction, only while owner and epoch are the renewer's.
``members``      node id -> address, roles, queues, started and expiry times.
``state_counts`` state -> number of tasks, changed in the same transaction as the tasks, so
                 ``counts()`` reads 5 rows instead of scanning every task.
``meta``         created_ms, num_shards, schema_version (migrations.py has the versions).

Threading: all writes run on ONE writer thread that owns the write connection, so the event
loop never blocks on disk and this process never contends with itself for SQLite's write lock.
Reads (get, load_due, counts, load_checkpoint) run on a second thread with their own read-only
connection; in WAL mode readers and the writer never wait for each other. Other processes may
open the same file (``taskwheel serve`` runs ingest, timer and dispatch apart): SQLite's file
lock serializes their writes, each waiting up to ``busy_timeout_ms`` before StoreUnavailable.
A third thread checkpoints the WAL into the database file a few times a second while writes
come in, so commits never pay for it. The three run ``thread_nice`` (5) below the process's
priority: when the cores are busy the kernel runs the event loop first, and the store's
threads, whose work has slack (a slice is read a second or more before it is due, acks are
group commits), take what is left. They hold the GIL only for short stretches, so a
descheduled one rarely keeps the loop from it. With the cores saturated, this cut the median
fire latency of the fire benchmark from about 20 ms to under 10.

Durability: every write is one transaction, committed before the coroutine returns. With
``synchronous=normal`` (the default) a commit is in the WAL file when it returns, which survives
kill -9 of any process; only a power loss or OS crash can lose the last commits.
``synchronous=full`` fsyncs the WAL on every commit and survives those too, at a cost per commit.

Garbage: ``load_due`` skips superseded and ended due rows; purging deletes them so the file
stops growing. Once a minute (``purge_every_s``), saving checkpoints starts a background
``purge()``: the dead rows of every bucket that ended 10 minutes before the slowest shard's
checkpoint. Live rows are never deleted, whatever the checkpoints say. Dead rows in
``due_far`` are promoted with the rest and purged from ``due``.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import sqlite3
from typing import Any, Callable, Mapping, Sequence, TypeVar

from taskwheel.clock import now_ms
from taskwheel.core import BUCKET_MS, bucket_of
from taskwheel.stores.base import (
    AlreadyEnded, InsertOutcome, Member, ShardLease, Store, StoreUnavailable, Transition, TransitionKind,
)
from taskwheel.stores.sqlite.columns import (
    JSON_TASK_RECORD, STATES, TASK_RECORD, decode_json, encode_json, insert_rows, record,
)
from taskwheel.stores.sqlite.migrations import SCHEMA_VERSION, create_or_upgrade
from taskwheel.stores.sqlite.queries import (
    ADD_COUNT, CANCEL_TASK, COPY_DUE_FAR_ROWS, COPY_DUE_ROWS, DEAD_DUE_IN_BUCKET, DELETE_DUE_ROW,
    DELETE_PROMOTED, FAR_BUCKET_MS, FIND_SUCCEEDING, FIRST_FAR_BUCKET, INSERT_SUCCEEDED,
    INSERT_TASK_UNLESS_TAKEN, MAX_TASK_ROWID, NEXT_BUCKET, PROMOTE_CHUNK_END, PROMOTE_ROWS,
    SAVE_CHECKPOINT, SELECT_CHECKPOINT, SELECT_COUNTS, SELECT_CURRENT, SELECT_DUE, SELECT_DUE_JSON,
    SELECT_KEY_HOLDER, SELECT_TASK, insert_due, insert_ended, insert_tasks, transaction,
    update_tasks, DELETE_LAPSED_MEMBERS, DELETE_MEMBER, RELEASE_SHARD, RENEW_SHARD, SAVE_MEMBER,
    SELECT_MEMBERS, SELECT_SHARD_LEASES, TAKE_SHARD,
)
from taskwheel.stores.sqlite.rows import SqliteReader, SqliteReadError, same_sqlite_as_python
from taskwheel.stores.sqlite.threads import Checkpointer, Every, configure_wal, start_store_thread
from taskwheel.task import TERMINAL_STATES, TaskRecord, TaskState

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_SHARDS = 16  # of a new file, unless asked for another count: one node owns them all
_MIN_SQLITE = (3, 38, 0)  # JSON functions built in by default; UPDATE ... FROM since 3.33
# The promoter moves a far bucket into ``due`` once it starts less than this ahead of the
# clock: well before the timer reads it (lookahead_ms, seconds), with time to spare for a
# promoter that runs every promote_every_s and moves a bucket in chunks of _PROMOTE_CHUNK.
PROMOTE_LEAD_MS = 60_000
_PROMOTE_CHUNK = 5000  # due rows moved per transaction, so inserts wait for it a few ms at most
_PURGE_CHUNK = 2000  # due rows deleted per transaction, so purging never stalls inserts for long
_PURGE_MARGIN_MS = 10 * BUCKET_MS  # how far behind the slowest checkpoint purging stays
_CACHE_KIB = 65536  # a connection's page cache, 64 MiB: the random task-id index stays hot
_SYNCHRONOUS = ("normal", "full", "extra")

_LEASE, _SUCCEED, _FAIL = TransitionKind.LEASE, TransitionKind.SUCCEED, TransitionKind.FAIL
_RESCHEDULING = frozenset({TransitionKind.LEASE, TransitionKind.RETRY})
_ENDING = {
    TransitionKind.SUCCEED: int(TaskState.SUCCEEDED),
    TransitionKind.FAIL: int(TaskState.FAILED),
}
_TERMINAL = frozenset(int(s) for s in TERMINAL_STATES)


def _far_from_ms() -> int:
    """Where ``due_far`` starts for a task inserted now: the first far bucket that starts at
    least PROMOTE_LEAD_MS ahead, one the promoter has not moved yet. Tasks due before it go
    straight to ``due``."""
    return -(-(now_ms() + PROMOTE_LEAD_MS) // FAR_BUCKET_MS) * FAR_BUCKET_MS


def _last(row: tuple) -> Any:
    return row[-1]


class SqliteStore(Store):
    """The embedded store. ``path`` is the database file (created with its directory if missing).

    ``num_shards`` is fixed when the file is created (0: the file's count, 16 for a new
    file); opening it with another count fails.
    ``synchronous``: "normal" (survives process crashes) or "full"/"extra" (also power loss).
    ``busy_timeout_ms``: how long a write waits for another process's write before failing.
    ``purge_every_s``: how often saving checkpoints also starts a purge of dead due rows
    (0: never; then call ``purge`` yourself).
    ``promote_every_s``: how often inserting or saving checkpoints also starts moving the far
    buckets that come within PROMOTE_LEAD_MS into ``due`` (0: never; then call ``promote``
    yourself; reads are right either way, only slower on rows not moved).
    ``thread_nice``: how much lower than the process the store's threads run (Linux niceness,
    0-19), so that on busy cores the event loop runs first (see threads.start_store_thread).
    Options may arrive as strings (they come from the store URL's query).
    """

    ordered_apply_depth = 2  # writes run one at a time, in order, on the writer thread

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_shards: int | str = 0,
        synchronous: str = "normal",
        busy_timeout_ms: int | str = 5_000,
        purge_every_s: float | str = 60.0,
        promote_every_s: float | str = 5.0,
        thread_nice: int | str = 5,
        **unknown: str,
    ):
        if unknown:
            raise ValueError(
                f"unknown SQLite store option(s) {', '.join(sorted(unknown))}: the options are "
                "shards, synchronous, busy_timeout_ms, purge_every_s, promote_every_s and "
                "thread_nice"
            )
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise RuntimeError(
                f"the embedded store needs SQLite {'.'.join(map(str, _MIN_SQLITE))} or newer "
                f"(json_each, UPDATE ... FROM); this Python links SQLite {sqlite3.sqlite_version}"
            )
        self.path = os.fspath(path)
        self.num_shards = self._asked_shards = int(num_shards) or DEFAULT_SHARDS
        if int(num_shards) < 0:
            raise ValueError(f"num_shards must be at least 1 (or 0: the file's), not {num_shards}")
        self._asked_shards = int(num_shards)
        self.synchronous = str(synchronous).lower()
        if self.synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous={synchronous!r}: use one of {', '.join(_SYNCHRONOUS)} "
                "(anything weaker could lose acknowledged tasks)"
            )
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.purge_every_s = float(purge_every_s)
        self.promote_every_s = float(promote_every_s)
        self.thread_nice = int(thread_nice)
        if not 0 <= self.thread_nice <= 19:
            raise ValueError(f"thread_nice={thread_nice!r}: use 0 (as the event loop) to 19 (lowest)")
        self.description = f"sqlite:{self.path}"
        self.created_ms = 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._due_reader: SqliteReader | None = None  # load_due's, on the reader thread
        self._checkpointer: Checkpointer | None = None
        self._purging = Every(self.purge_every_s)
        self._promoting = Every(self.promote_every_s)

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        nice = self.thread_nice
        writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="taskwheel-sqlite-w", initializer=start_store_thread,
            initargs=("tw-sqlite-write", nice),
        )
        reader = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="taskwheel-sqlite-r", initializer=start_store_thread,
            initargs=("tw-sqlite-read", nice),
        )
        loop = asyncio.get_running_loop()
        try:
            self._wconn, self.created_ms = await loop.run_in_executor(writer, self._open_writer)
            self._rconn = await loop.run_in_executor(reader, self._connect, True)
            if same_sqlite_as_python():
                self._due_reader = await loop.run_in_executor(reader, self._open_due_reader)
        except BaseException:
            if self._rconn is not None:
                await loop.run_in_executor(reader, self._rconn.close)
                self._rconn = None
            if self._wconn is not None:
                await loop.run_in_executor(writer, self._wconn.close)
                self._wconn = None
            writer.shutdown()
            reader.shutdown()
            raise
        self._writer, self._reader = writer, reader
        self._checkpointer = Checkpointer(
            lambda: self._connect(False), self.description, self.thread_nice
        )

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        if writer is None or reader is None:
            return
        await self._purging.cancel()
        await self._promoting.cancel()
        self._writer = self._reader = None
        loop = asyncio.get_running_loop()
        if self._checkpointer is not None:
            await loop.run_in_executor(writer, self._checkpointer.stop)
            self._checkpointer = None
        if self._due_reader is not None:
            await loop.run_in_executor(reader, self._due_reader.close)
            self._due_reader = None
        if self._rconn is not None:
            await loop.run_in_executor(reader, self._rconn.close)
        if self._wconn is not None:
            await loop.run_in_executor(writer, self._wconn.close)
        self._rconn = self._wconn = None
        reader.shutdown()
        writer.shutdown()

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # created here, then used only on its executor's thread
                cached_statements=64,
            )
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            conn.execute("PRAGMA temp_store = MEMORY")
            if read_only:
                conn.execute("PRAGMA query_only = ON")
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreUnavailable(f"{self.description}: cannot use WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
                configure_wal(conn)
            return conn
        except sqlite3.Error as e:
            raise StoreUnavailable(f"{self.description}: cannot open: {e}") from e

    def _open_due_reader(self) -> SqliteReader:
        try:
            return SqliteReader(self.path, SELECT_DUE, self.busy_timeout_ms, _CACHE_KIB)
        except SqliteReadError as e:
            raise StoreUnavailable(f"{self.description}: cannot open: {e}") from e

    def _open_writer(self) -> tuple[sqlite3.Connection, int]:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"{self.description}: cannot create {directory}: {e}") from e
        conn = self._connect(False)
        try:
            with transaction(conn):
                meta = create_or_upgrade(conn, self.num_shards)
            if not self._asked_shards:
                self.num_shards = meta["num_shards"]
            if meta["num_shards"] != self.num_shards:
                raise ValueError(
                    f"{self.path} was created with {meta['num_shards']} shards, but this store "
                    f"is configured with {self.num_shards}; the shard count is fixed when a store "
                    f"is created (open it with shards={meta['num_shards']})"
                )
            if meta["schema_version"] != SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} has schema version {meta['schema_version']}; this taskwheel "
                    f"reads version {SCHEMA_VERSION}"
                )
            return conn, int(meta["created_ms"])
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise StoreUnavailable(f"{self.description}: cannot open: {e}") from e
            raise

    # ---- running blocking work off the event loop --------------------------------------------

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        if self._writer is None:
            raise StoreUnavailable(f"{self.description}: store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._writer, self._guard_write, fn, args
            )
        finally:
            if self._checkpointer is not None:
                self._checkpointer.wake()

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._reader is None:
            raise StoreUnavailable(f"{self.description}: store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._guard, fn, args)

    def _guard_write(self, fn: Callable[..., T], args: tuple) -> T:
        result = self._guard(fn, args)
        if self._checkpointer is not None:
            self._checkpointer.restart_if_wanted(self._conn_w())
        return result

    def _guard(self, fn: Callable[..., T], args: tuple) -> T:
        try:
            return fn(*args)
        except (sqlite3.OperationalError, sqlite3.InternalError, SqliteReadError) as e:
            # Locked, disk full, I/O error: the transaction was rolled back, nothing acknowledged.
            raise StoreUnavailable(f"{self.description}: {e}") from e
        except sqlite3.DatabaseError as e:
            if type(e) is sqlite3.DatabaseError:  # e.g. "database disk image is malformed"
                raise StoreUnavailable(f"{self.description}: {e}") from e
            raise

    # ---- writes ------------------------------------------------------------------------------

    async def insert(self, tasks: Sequence[TaskRecord]) -> list[InsertOutcome]:
        if not tasks:
            return []
        outcomes = await self._write(self._insert, tasks)
        self._promote_soon()
        return outcomes

    def _insert(self, tasks: Sequence[TaskRecord]) -> list[InsertOutcome]:
        n_shards = self.num_shards
        for t in tasks:
            if not 0 <= t.shard < n_shards:
                raise ValueError(f"task {t.task_id}: shard {t.shard} outside 0..{n_shards - 1}")
        rows = insert_rows(tasks)
        conn = self._conn_w()
        with transaction(conn):
            # Rowids grow, and this transaction holds the write lock: every task row it adds
            # lies above this mark, so one INSERT ... SELECT writes their due rows in C.
            mark = conn.execute(MAX_TASK_ROWID).fetchone()[0]
            # Optimistic: the whole batch at once, skipping any row whose id or key is taken.
            # Only when a row was skipped is the batch redone row by row to learn which task
            # holds what; batches without duplicates never pay for the lookups.
            conn.execute("SAVEPOINT batch")
            changes = conn.total_changes
            insert_tasks.run(conn, rows)
            if conn.total_changes - changes == len(rows):
                outcomes = [InsertOutcome(t.task_id) for t in tasks]
            else:
                conn.execute("ROLLBACK TO batch")
                outcomes = self._insert_one_by_one(conn, tasks, rows)
            conn.execute("RELEASE batch")
            far_from = _far_from_ms()
            added = (conn.execute(COPY_DUE_ROWS, (mark, far_from)).rowcount
                     + conn.execute(COPY_DUE_FAR_ROWS, (mark, far_from)).rowcount)
            conn.execute(ADD_COUNT, (added, int(TaskState.SCHEDULED)))
        return outcomes

    @staticmethod
    def _insert_one_by_one(
        conn: sqlite3.Connection, tasks: Sequence[TaskRecord], rows: list
    ) -> list[InsertOutcome]:
        # A task whose (queue, key) or id is taken is not stored; its outcome names the task that
        # holds it. In order, so the first of two tasks with one key in this batch wins.
        outcomes = []
        for t, row in zip(tasks, rows):
            if conn.execute(INSERT_TASK_UNLESS_TAKEN, row).rowcount == 1:
                outcomes.append(InsertOutcome(t.task_id))
                continue
            holder = None
            if t.idempotency_key:
                holder = conn.execute(SELECT_KEY_HOLDER, (t.queue, t.idempotency_key)).fetchone()
            # Otherwise the id itself is taken (an insert retried after an error, say).
            outcomes.append(InsertOutcome(holder[0] if holder else t.task_id, duplicate=True))
        return outcomes

    async def cancel(self, task_id: str, now_ms: int) -> TaskRecord | None:
        return await self._write(self._cancel, task_id, now_ms)

    def _cancel(self, task_id: str, now_ms: int) -> TaskRecord | None:
        conn = self._conn_w()
        with transaction(conn):
            row = conn.execute(SELECT_TASK, (task_id,)).fetchone()
            if row is None:
                return None
            cancelled = record(row)
            if cancelled.state in TERMINAL_STATES:
                raise AlreadyEnded(cancelled)
            conn.execute(CANCEL_TASK, (int(TaskState.CANCELLED), now_ms, task_id))
            conn.execute(ADD_COUNT, (-1, int(cancelled.state)))
            conn.execute(ADD_COUNT, (1, int(TaskState.CANCELLED)))
        cancelled.state = TaskState.CANCELLED
        cancelled.updated_ms = now_ms
        return cancelled

    async def apply(self, transitions: Sequence[Transition], now_ms: int) -> list[bool]:
        if not transitions:
            return []
        for t in transitions:  # refused before anything is written
            if t.kind in _RESCHEDULING:
                if t.task is None:
                    raise ValueError(
                        f"{t.kind.name} of task {t.task_id} carries no task: the new due row "
                        "needs its fields"
                    )
                self._check_shard(t.shard)
            elif t.kind not in _ENDING:
                raise ValueError(f"unknown transition kind {t.kind!r} for task {t.task_id}")
        return await self._write(self._apply, transitions, now_ms)

    def _apply(self, transitions: Sequence[Transition], now_ms: int) -> list[bool]:
        # Most of a busy batch is acks, each of a task named once in it: those are settled in
        # SQL (see queries.FIND_SUCCEEDING), which runs without the GIL the event loop needs; the rest
        # in order, in Python. The two parts name different tasks, so neither sees the other's
        # effects, and one transaction holds both.
        named = collections.Counter(t.task_id for t in transitions)
        once = [t.kind is _SUCCEED and named[t.task_id] == 1 for t in transitions]
        conn = self._conn_w()
        with transaction(conn):
            if all(once):
                return self._succeed_once(conn, transitions, now_ms)
            succeeded = iter(self._succeed_once(
                conn, list(itertools.compress(transitions, once)), now_ms
            ))
            others = iter(self._apply_in_order(
                conn, [t for t, fast in zip(transitions, once) if not fast], now_ms
            ))
            return [next(succeeded) if fast else next(others) for fast in once]

    @staticmethod
    def _succeed_once(
        conn: sqlite3.Connection, transitions: Sequence[Transition], now_ms: int
    ) -> list[bool]:
        if not transitions:
            return []
        keys, rowids, scheduled, leased = conn.execute(FIND_SUCCEEDING, (
            encode_json([t.task_id for t in transitions]),
            encode_json([t.expected_gen for t in transitions]),
        )).fetchone()
        applied = [False] * len(transitions)
        for key in decode_json(keys):
            applied[key] = True
        if scheduled or leased:
            conn.execute(INSERT_SUCCEEDED, (now_ms, rowids))
            conn.executemany(ADD_COUNT, [
                (-int(scheduled), int(TaskState.SCHEDULED)), (-int(leased), int(TaskState.LEASED)),
                (int(scheduled + leased), int(TaskState.SUCCEEDED)),
            ])
        return applied

    @staticmethod
    def _apply_in_order(
        conn: sqlite3.Connection, transitions: Sequence[Transition], now_ms: int
    ) -> list[bool]:
        if not transitions:
            return []
        leased, scheduled = int(TaskState.LEASED), int(TaskState.SCHEDULED)
        # task_id -> [gen, state, attempt, due_ms, last_error, rowid], advanced as
        # transitions apply; the rowid spares each UPDATE a second index lookup. One
        # statement step for all of them (see queries.Bulk for why steps are counted).
        found = conn.execute(
            SELECT_CURRENT, (encode_json(list({t.task_id: None for t in transitions})),)
        ).fetchone()[0]
        current: dict[str, list] = {row[0]: row[1:] for row in decode_json(found)}
        applied = []
        updates: dict[int, tuple] = {}
        ended = []
        due_rows = []
        count_changes: dict[int, int] = {}
        for t in transitions:
            cur = current.get(t.task_id)
            if cur is None or cur[0] != t.expected_gen or cur[1] in _TERMINAL:
                applied.append(False)
                continue
            old_state = cur[1]
            kind = t.kind
            if kind in _RESCHEDULING:
                gen = cur[0] + 1
                cur[0], cur[2], cur[3] = gen, t.attempt, t.due_ms
                if kind == _LEASE:
                    cur[1] = leased
                else:
                    cur[1], cur[4] = scheduled, t.error
                due_rows.append((t.shard, t.due_ms // BUCKET_MS, t.due_ms, gen, cur[5]))
                # One row per task, its last state: an UPDATE ... FROM uses one match per row.
                updates[cur[5]] = (cur[0], cur[1], cur[2], cur[3], now_ms, cur[4], cur[5])
            else:
                # Ended: a narrow row of its own, the task row stays as it was (see ended).
                cur[1] = _ENDING[kind]
                if kind == _FAIL:
                    cur[4] = t.error
                ended.append((cur[3], cur[5], cur[1], now_ms, cur[4]))
            if cur[1] != old_state:
                count_changes[old_state] = count_changes.get(old_state, 0) - 1
                count_changes[cur[1]] = count_changes.get(cur[1], 0) + 1
            applied.append(True)
        if updates or ended:
            # In key order: neighbouring rows share pages, so each page is visited once.
            update_tasks.run(conn, sorted(updates.values(), key=_last))
            insert_due.run(conn, due_rows)
            insert_ended.run(conn, sorted(ended))
            conn.executemany(
                ADD_COUNT, [(n, state) for state, n in count_changes.items() if n]
            )
        return applied

    # ---- shard leases and members ---------------------------------------------------------------

    async def shard_leases(self) -> list[ShardLease]:
        # On the writer: a lease read right after a write this process made sees it.
        return await self._write(self._shard_leases)

    def _shard_leases(self) -> list[ShardLease]:
        rows = self._conn_w().execute(SELECT_SHARD_LEASES, (self.num_shards, self.created_ms)).fetchall()
        return [ShardLease(*row) for row in rows]

    async def acquire_shards(self, node_id: str, seen: Sequence[ShardLease], expires_ms: int) -> list[ShardLease]:
        for lease in seen:
            self._check_shard(lease.shard)
        return await self._write(self._acquire_shards, node_id, list(seen), expires_ms) if seen else []

    def _acquire_shards(self, node_id: str, seen: list[ShardLease], expires_ms: int) -> list[ShardLease]:
        conn = self._conn_w()
        taken = []
        with transaction(conn):
            for lease in seen:
                if conn.execute(TAKE_SHARD, (lease.shard, node_id, expires_ms, lease.owner, lease.epoch)).rowcount:
                    taken.append(ShardLease(lease.shard, node_id, lease.epoch + 1, expires_ms, lease.checkpoint_ms))
        return taken

    async def renew_shards(self, node_id: str, held: Mapping[int, tuple[int, int]], expires_ms: int) -> set[int]:
        for shard in held:
            self._check_shard(shard)
        if not held:
            return set()
        lost = await self._write(self._renew_shards, node_id, dict(held), expires_ms)
        self._purge_soon()
        self._promote_soon()
        return lost

    def _renew_shards(self, node_id: str, held: dict[int, tuple[int, int]], expires_ms: int | None) -> set[int]:
        """Renews (or, with expires_ms None, releases) the shards still held; saves their
        checkpoints in the same transaction. Returns the shards not held."""
        conn = self._conn_w()
        lost = set()
        saved = []
        with transaction(conn):
            for shard, (epoch, checkpoint_ms) in held.items():
                if expires_ms is None:
                    changed = conn.execute(RELEASE_SHARD, (shard, node_id, epoch)).rowcount
                else:
                    changed = conn.execute(RENEW_SHARD, (expires_ms, shard, node_id, epoch)).rowcount
                if changed:
                    # The unsaved default is the creation time, so nothing below it is stored either.
                    saved.append((shard, checkpoint_ms, self.created_ms))
                else:
                    lost.add(shard)
            conn.executemany(SAVE_CHECKPOINT, saved)
        return lost

    async def release_shards(self, node_id: str, held: Mapping[int, tuple[int, int]]) -> set[int]:
        for shard in held:
            self._check_shard(shard)
        if not held:
            return set()
        lost = await self._write(self._renew_shards, node_id, dict(held), None)
        return set(held) - lost

    async def heartbeat(self, member: Member) -> None:
        await self._write(self._heartbeat, member)

    def _heartbeat(self, member: Member) -> None:
        conn = self._conn_w()
        with transaction(conn):
            conn.execute(SAVE_MEMBER, (member.node_id, member.address, ",".join(sorted(member.roles)),
                                       encode_json(sorted(member.queues)), member.started_ms, member.expires_ms))
            # A member lapsed an hour ago has stopped or crashed; its row goes.
            conn.execute(DELETE_LAPSED_MEMBERS, (member.expires_ms - 3_600_000,))

    async def members(self, now_ms: int) -> list[Member]:
        return await self._write(self._members, now_ms)

    def _members(self, now_ms: int) -> list[Member]:
        rows = self._conn_w().execute(SELECT_MEMBERS, (now_ms,)).fetchall()
        return [Member(node_id, address, frozenset(filter(None, roles.split(","))), frozenset(decode_json(queues)),
                       started_ms, expires_ms) for node_id, address, roles, queues, started_ms, expires_ms in rows]

    async def leave(self, node_id: str) -> None:
        await self._write(self._leave, node_id)

    def _leave(self, node_id: str) -> None:
        conn = self._conn_w()
        with transaction(conn):
            conn.execute(DELETE_MEMBER, (node_id,))

    # ---- promoting far due rows ----------------------------------------------------------------

    async def promote(self, before_ms: int | None = None) -> int:
        """Moves the due rows of every far bucket that starts before ``before_ms`` (by default
        PROMOTE_LEAD_MS from now) from ``due_far`` into ``due``; returns how many. Each chunk
        of a bucket moves in one transaction, so a read sees a row in one table or the other,
        and inserts wait for one chunk at most. Runs by itself (see ``promote_every_s``)."""
        if before_ms is None:
            before_ms = now_ms() + PROMOTE_LEAD_MS
        last_bucket = (before_ms - 1) // FAR_BUCKET_MS
        moved = 0
        while True:
            n = await self._write(self._promote_chunk, last_bucket)
            if not n:
                return moved
            moved += n

    def _promote_soon(self) -> None:
        self._promoting.start(self._promote_in_background)

    async def _promote_in_background(self) -> None:
        try:
            moved = await self.promote()
            if moved:
                log.debug("%s: promoted %d far due rows", self.description, moved)
        except StoreUnavailable as e:
            log.warning("%s: promoting far due rows failed, will retry: %s", self.description, e)
        except Exception:  # a bug: loud, and retried at the next promote_every_s
            log.exception("%s: promoting far due rows failed", self.description)

    def _promote_chunk(self, last_bucket: int) -> int:
        """Moves up to _PROMOTE_CHUNK rows of the earliest far bucket at or before
        ``last_bucket``, in insertion order; returns how many (0: none left)."""
        conn = self._conn_w()
        with transaction(conn):
            bucket = conn.execute(FIRST_FAR_BUCKET).fetchone()[0]
            if bucket is None or bucket > last_bucket:
                return 0
            end = conn.execute(PROMOTE_CHUNK_END, (bucket, _PROMOTE_CHUNK)).fetchone()[0]
            moved = conn.execute(PROMOTE_ROWS, (bucket, end)).rowcount
            conn.execute(DELETE_PROMOTED, (bucket, end))
        return moved

    # ---- garbage -----------------------------------------------------------------------------

    async def purge_before(self, before_ms: int) -> int:
        """Deletes dead due rows (superseded, or of a terminal task) in every bucket that ends at
        or before ``before_ms``; returns how many. Live rows are never touched, so any value is
        safe; a value well behind the timers (see ``purge``) keeps the work away from the rows
        they are reading. The reader thread finds dead rows and the writer deletes them in
        small transactions, so inserts interleave. A dead row never comes back to life (gens
        only grow, ended tasks stay ended), so nothing changes between finding and deleting."""
        end_bucket = bucket_of(before_ms)  # buckets strictly below this one end by before_ms
        deleted = 0
        for shard in range(self.num_shards):
            bucket = await self._read(self._next_bucket, shard, None, end_bucket)
            while bucket is not None:
                after = (-1, -1)
                while True:
                    dead = await self._read(self._dead_due_rows, shard, bucket, after)
                    if dead:
                        await self._write(self._delete_due_rows, shard, bucket, dead)
                        deleted += len(dead)
                    if len(dead) < _PURGE_CHUNK:
                        break
                    after = dead[-1]
                bucket = await self._read(self._next_bucket, shard, bucket, end_bucket)
        return deleted

    async def purge(self, margin_ms: int = _PURGE_MARGIN_MS) -> int:
        """``purge_before(smallest checkpoint - margin_ms)``. Runs by itself (see
        ``purge_every_s``); callable for tests and maintenance."""
        checkpoints = [await self.load_checkpoint(s) for s in range(self.num_shards)]
        return await self.purge_before(min(checkpoints) - margin_ms)

    def _purge_soon(self) -> None:
        # Checkpoints advance every second or so; purging follows them at most once per period.
        self._purging.start(self._purge_in_background)

    async def _purge_in_background(self) -> None:
        try:
            deleted = await self.purge()
            log.debug("%s: purged %d dead due rows", self.description, deleted)
        except StoreUnavailable as e:
            log.warning("%s: purge failed, will retry: %s", self.description, e)

    def _next_bucket(self, shard: int, after: int | None, end: int) -> int | None:
        lowest = after + 1 if after is not None else -(2**62)
        return self._conn_r().execute(NEXT_BUCKET, (shard, lowest, end)).fetchone()[0]

    def _dead_due_rows(self, shard: int, bucket: int, after: tuple[int, int]) -> list[tuple[int, int]]:
        """(task_rowid, gen) of up to _PURGE_CHUNK dead rows of a partition, after ``after``."""
        return self._conn_r().execute(
            DEAD_DUE_IN_BUCKET, (shard, bucket, *after, _PURGE_CHUNK)
        ).fetchall()

    def _delete_due_rows(self, shard: int, bucket: int, dead: list[tuple[int, int]]) -> None:
        conn = self._conn_w()
        with transaction(conn):
            conn.executemany(DELETE_DUE_ROW, [(shard, bucket, rowid, gen) for rowid, gen in dead])

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._read(self._get, task_id)

    def _get(self, task_id: str) -> TaskRecord | None:
        row = self._conn_r().execute(SELECT_TASK, (task_id,)).fetchone()
        return None if row is None else record(row)

    async def load_due(self, shard: int, from_ms: int, to_ms: int) -> list[TaskRecord]:
        self._check_shard(shard)
        if to_ms <= from_ms:
            return []
        return await self._read(self._load_due, shard, from_ms, to_ms)

    def _load_due(self, shard: int, from_ms: int, to_ms: int) -> list[TaskRecord]:
        params = (shard, bucket_of(from_ms), bucket_of(to_ms - 1), from_ms, to_ms,
                  from_ms // FAR_BUCKET_MS, (to_ms - 1) // FAR_BUCKET_MS)
        if self._due_reader is not None:
            return self._due_reader.records(params, TASK_RECORD)
        rows = decode_json(self._conn_r().execute(SELECT_DUE_JSON, params).fetchone()[0])
        return [JSON_TASK_RECORD.build(row) for row in rows]

    async def load_checkpoint(self, shard: int) -> int:
        self._check_shard(shard)
        return await self._read(self._load_checkpoint, shard)

    def _load_checkpoint(self, shard: int) -> int:
        row = self._conn_r().execute(SELECT_CHECKPOINT, (shard,)).fetchone()
        return self.created_ms if row is None else row[0]

    async def counts(self) -> dict[TaskState, int]:
        return await self._read(self._counts)

    def _counts(self) -> dict[TaskState, int]:
        rows = self._conn_r().execute(SELECT_COUNTS).fetchall()
        return {STATES[state]: n for state, n in rows}

    def _conn_w(self) -> sqlite3.Connection:
        assert self._wconn is not None
        return self._wconn

    def _conn_r(self) -> sqlite3.Connection:
        assert self._rconn is not None
        return self._rconn
