"""The embedded store: one SQLite file in WAL mode, laid out the way the Cassandra store is.

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
                 commit. Appending at the tail of each active partition instead made inserts
                 2.5x faster (500,000 tasks due over 10 minutes, batches of 1000), while a read
                 stays one range per bucket. Why not by second, so that a one-second slice
                 skips nothing: 16 shards x 3,000 seconds of a 50-minute spread are 48,000
                 tails instead of 800, too many pages to keep hot; 1M tasks inserted 22 -> 30 us
                 each, on the writer thread that bounds submits, for a read 30-50 % cheaper on
                 the reader's (tried, measured and reverted).
``due_far``      the due rows of new tasks due at or after the first far bucket (5 minutes of
                 due times, every shard's) that starts PROMOTE_LEAD_MS or more ahead, keyed by
                 (far bucket, task rowid, gen): insertion order within a far bucket, so tasks
                 due over an hour are appended at 12 points instead of scattered over 16 x 60
                 partition tails, about one dirtied page per task in a batch of 1,000 (200,000
                 tasks due over 1 h: 11.9 -> 5.6 us of the writer and 2.3 -> 0.6 KB written a
                 task, as cheap as tasks due within two minutes). The promoter (``promote``)
                 moves a far bucket into ``due`` once it starts less than PROMOTE_LEAD_MS
                 ahead, in chunks of insertion order, each sorted by ``due``'s key so it is
                 written as runs (1.8 us and 0.15 KB a task, later). ``load_due`` reads both
                 tables in one statement, one snapshot, and a chunk moves in one transaction,
                 so a read sees each row once, promoted or not.
``tasks``        by task_id (unique index): current gen, state, attempt, due_ms, the spec and
                 the bookkeeping. A due row is live when ``tasks.gen`` equals its gen, the
                 state is SCHEDULED or LEASED and the task has not ended; ``load_due`` joins on
                 that (through the due row's ``task_rowid``) instead of deleting superseded
                 rows. Time-ordered task ids keep this index append-only too.
``ended``        (due_ms, task rowid) -> final state, updated_ms, last_error, for tasks ended
                 by a SUCCEED or FAIL: a narrow row instead of rewriting the wide task row.
                 Tasks end in fire order, which is random against insert order, so each
                 rewrite dirtied a page of ``tasks`` of its own (16 us per ack at 400K tasks;
                 7 here). Keyed by the due time of the row the task ended at (its task row's
                 due_ms, never updated after), so acks land at the tail of the B-tree; keyed by
                 rowid (version 2) each landed on a page of its own, and a commit of 2,048 acks
                 wrote ~1,300 pages to the WAL: 11 us per ack against 5 (500K tasks due over
                 10 s, acked in due order). Readers take a task's state, updated_ms and
                 last_error from here when present.
``tasks_idem``   unique (queue, idempotency_key), partial: tasks without a key cost nothing.
``checkpoints``  shard -> ms, only ever raised.
``state_counts`` state -> number of tasks, changed in the same transaction as the tasks, so
                 ``counts()`` reads 5 rows instead of scanning every task.
``meta``         created_ms, num_shards, schema_version (2 added ``ended`` and narrowed
                 ``due`` to the task's rowid, clustered by partition; 4 keyed ``ended`` by
                 due time; 5 added ``due_far``; 1, 2 and 4 are upgraded when opened, in one
                 transaction that holds the write lock ~1.3 s per million ended tasks; 3, a
                 layout tried and reverted, is refused).

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
descheduled one rarely keeps the loop from it. fire_50k alternating 0 and 5 on a slow spell:
p99 217/354/160 ms against 161/86/136, p50 19-21 against 4-8 ms (10 gave no more).

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
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from importlib import resources
from typing import Any, Callable, Mapping, Sequence, TypeVar

from taskwheel.clock import now_ms
from taskwheel.core import BUCKET_MS, RecordShape, bucket_of
from taskwheel.stores.base import AlreadyEnded, InsertOutcome, Store, StoreUnavailable, Transition, TransitionKind
from taskwheel.stores.sqlite.rows import SqliteReader, SqliteReadError, same_sqlite_as_python
from taskwheel.task import TERMINAL_STATES, TaskRecord, TaskState

T = TypeVar("T")
log = logging.getLogger(__name__)

SCHEMA_VERSION = 5  # 3 was a layout of due rows by second, tried for a day and reverted
_MIN_SQLITE = (3, 38, 0)  # JSON functions built in by default; UPDATE ... FROM since 3.33

# schema.sql, the current layout: run whole on every open, and table by table by the upgrades.
_SCHEMA = resources.files(__package__).joinpath("schema.sql").read_text()


def _creating(table: str) -> str:
    """The statement of schema.sql that creates ``table``."""
    for statement in _SCHEMA.split(";"):
        if re.search(r"CREATE TABLE IF NOT EXISTS %s \(" % table, statement):
            return statement
    raise KeyError(table)


# Column order of both SELECTs below is TaskRecord's field order, so one function builds records.
_TASK_COLUMNS = (
    "task_id, shard, queue, payload, fire_at_ms, due_ms, state, attempt, max_attempts, gen, "
    "headers, idempotency_key, lease_ms, traceparent, created_ms, updated_ms, last_error"
)
# A new task is SCHEDULED (1) at gen 1, whatever the record says.
_INSERT_TASK_UNLESS_TAKEN = (
    f"INSERT INTO tasks ({_TASK_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_DUE_COLUMNS = "shard, bucket, due_ms, gen, task_rowid"


def _floor_div_sql(column: str, divisor: int) -> str:
    # SQLite's integer division truncates toward zero; buckets are floor(due_ms / size).
    return f"CASE WHEN {column} >= 0 THEN {column} / {divisor} ELSE -((-{column} + {divisor - 1}) / {divisor}) END"


_BUCKET_SQL = _floor_div_sql("due_ms", BUCKET_MS)
# A far bucket is FAR_BUCKET_MS of due times, every shard's: an hour of them is 12 insertion
# points in due_far, where ``due`` has 16 x 60 (see the module's docstring).
FAR_BUCKET_MS = 5 * BUCKET_MS
_FAR_BUCKET_SQL = _floor_div_sql("due_ms", FAR_BUCKET_MS)
# The promoter moves a far bucket into ``due`` once it starts less than this ahead of the
# clock: well before the timer reads it (lookahead_ms, seconds), with time to spare for a
# promoter that runs every promote_every_s and moves a bucket in chunks of _PROMOTE_CHUNK.
PROMOTE_LEAD_MS = 60_000
_PROMOTE_CHUNK = 5000  # due rows moved per transaction, so inserts wait for it a few ms at most
# A new task's due row goes to ``due`` when it is due before ?2, the start of the first far
# bucket the promoter has not reached (see _far_from_ms), and to ``due_far`` otherwise.
_COPY_DUE_ROWS = f"""
INSERT INTO due ({_DUE_COLUMNS})
SELECT shard, {_BUCKET_SQL}, due_ms, gen, rowid FROM tasks WHERE rowid > ?1 AND due_ms < ?2
"""
_COPY_DUE_FAR_ROWS = f"""
INSERT INTO due_far (far_bucket, task_rowid, gen, shard, due_ms)
SELECT {_FAR_BUCKET_SQL}, rowid, gen, shard, due_ms FROM tasks WHERE rowid > ?1 AND due_ms >= ?2
"""
# One chunk of a far bucket's rows, in insertion order: ?1 the far bucket, ?2 the last task
# rowid of the chunk. Copied into ``due`` sorted by its key, so each partition's rows are
# written as one run, then deleted from ``due_far`` as one range.
_PROMOTE_CHUNK_END = (
    "SELECT max(task_rowid) FROM "
    "(SELECT task_rowid FROM due_far WHERE far_bucket = ?1 ORDER BY task_rowid LIMIT ?2)"
)
_PROMOTE_ROWS = f"""
INSERT INTO due ({_DUE_COLUMNS})
SELECT shard, {_BUCKET_SQL}, due_ms, gen, task_rowid FROM due_far
WHERE far_bucket = ?1 AND task_rowid <= ?2
ORDER BY 1, 2, 5, 4
"""
_DELETE_PROMOTED = "DELETE FROM due_far WHERE far_bucket = ?1 AND task_rowid <= ?2"
# A task's ended row, if any: keyed by the due time of the row it ended at, which stays the
# task row's due_ms (an ended task's row is never updated again).
_ENDED_OF_T = "e.due_ms = t.due_ms AND e.task_rowid = t.rowid"
# A task row with its ended row, if any, laid over it.
_TASK_WITH_END = (
    "t.task_id, t.shard, t.queue, t.payload, t.fire_at_ms, t.due_ms, coalesce(e.state, t.state), "
    "t.attempt, t.max_attempts, t.gen, t.headers, t.idempotency_key, t.lease_ms, t.traceparent, "
    "t.created_ms, coalesce(e.updated_ms, t.updated_ms), coalesce(e.last_error, t.last_error)"
)
_SELECT_TASK = (
    f"SELECT {_TASK_WITH_END} FROM tasks AS t LEFT JOIN ended AS e ON {_ENDED_OF_T} "
    "WHERE t.task_id = ?"
)
_LIVE = (
    f"t.state IN ({int(TaskState.SCHEDULED)}, {int(TaskState.LEASED)}) "
    f"AND NOT EXISTS (SELECT 1 FROM ended AS e WHERE {_ENDED_OF_T})"
)
# The bucket bounds pick the partitions, due_ms is filtered inside the index, and only the rows
# in range are fetched and joined, in no particular order: sorting the wide joined rows by
# (due_ms, task_id) was a quarter to a third of the read, and the timer's wheel orders them.
# A live due row's gen is its task's, so its due_ms and attempt are the task row's too.
# Due rows not promoted yet are read from due_far in the same statement, so one snapshot: a
# promotion moves rows in one transaction, and a read sees each row in one table or the other.
# Once promoted, the far part is one index probe that finds nothing.
_DUE_RECORD_COLUMNS = """
SELECT t.task_id, t.shard, t.queue, t.payload, t.fire_at_ms, d.due_ms, t.state, t.attempt,
       t.max_attempts, d.gen, t.headers, t.idempotency_key, t.lease_ms, t.traceparent,
       t.created_ms, t.updated_ms, t.last_error"""
_SELECT_DUE = f"""{_DUE_RECORD_COLUMNS}
FROM due AS d JOIN tasks AS t ON t.rowid = d.task_rowid
WHERE d.shard = ?1 AND d.bucket >= ?2 AND d.bucket <= ?3 AND d.due_ms >= ?4 AND d.due_ms < ?5
  AND d.gen = t.gen AND {_LIVE}
UNION ALL{_DUE_RECORD_COLUMNS}
FROM due_far AS d JOIN tasks AS t ON t.rowid = d.task_rowid
WHERE d.far_bucket >= ?6 AND d.far_bucket <= ?7 AND d.shard = ?1 AND d.due_ms >= ?4
  AND d.due_ms < ?5 AND d.gen = t.gen AND {_LIVE}
"""
# The same rows as one JSON array, in one statement step (see _Bulk for why steps are counted),
# for a Python whose sqlite3 module has its own copy of SQLite, where the core's SqliteReader,
# which reads _SELECT_DUE without the GIL, must not be used. Payloads travel as hex.
_SELECT_DUE_JSON = f"""
SELECT json_group_array(json_array(task_id, shard, queue, hex(payload), fire_at_ms, due_ms, state,
       attempt, max_attempts, gen, headers, idempotency_key, lease_ms, traceparent, created_ms,
       updated_ms, last_error))
FROM ({_SELECT_DUE})
"""
_ADD_COUNT = "UPDATE state_counts SET n = n + ? WHERE state = ?"
# The current state of the tasks named in a JSON array, as one JSON array of rows.
_SELECT_CURRENT = (
    "SELECT json_group_array(json_array(t.task_id, t.gen, coalesce(e.state, t.state), t.attempt, "
    "t.due_ms, coalesce(e.last_error, t.last_error), t.rowid)) "
    f"FROM tasks AS t LEFT JOIN ended AS e ON {_ENDED_OF_T} "
    "WHERE t.task_id IN (SELECT value FROM json_each(?))"
)
# The acks of tasks named once in a batch, settled in two statements with no Python per task:
# ?1 the task ids, ?2 the gens they expect (JSON arrays of the same length). The first finds
# the live ones whose gen matches: their positions in ?1 and their rowids (in the order of the
# ended rows they get, so neighbouring ones share pages) and how many were SCHEDULED and
# LEASED; the second writes their ended rows from that rowid array, keeping each last error.
_FIND_SUCCEEDING = f"""
WITH expected AS MATERIALIZED (SELECT key, value AS gen FROM json_each(?2)),
live AS (
    SELECT j.key AS key, t.rowid AS task_rowid, t.state AS state
    FROM json_each(?1) AS j JOIN tasks AS t ON t.task_id = j.value
    JOIN expected AS x ON x.key = j.key
    WHERE t.gen = x.gen AND {_LIVE}
    ORDER BY t.due_ms, t.rowid
)
SELECT json_group_array(key), json_group_array(task_rowid),
       total(state = {int(TaskState.SCHEDULED)}), total(state = {int(TaskState.LEASED)})
FROM live
"""
_INSERT_SUCCEEDED = (
    f"INSERT INTO ended (due_ms, task_rowid, state, updated_ms, last_error) "
    f"SELECT t.due_ms, t.rowid, {int(TaskState.SUCCEEDED)}, ?, t.last_error "
    "FROM json_each(?) AS j JOIN tasks AS t ON t.rowid = j.value"
)
# The bulk forms of the writes above, for _Bulk: {values} becomes a VALUES list whose columns are
# column1, column2, ... (SQLite's names), and NULL padding rows match nothing.
_BULK_INSERT_TASKS = (
    f"INSERT INTO tasks ({_TASK_COLUMNS}) "
    "SELECT column1, column2, column3, column4, column5, column6, 1, column7, column8, 1, "
    "column9, column10, column11, column12, column13, column14, column15 "
    "FROM (VALUES {values}) WHERE column1 IS NOT NULL ON CONFLICT DO NOTHING"
)
_BULK_INSERT_DUE = (
    f"INSERT INTO due ({_DUE_COLUMNS}) SELECT * FROM (VALUES {{values}}) WHERE column1 IS NOT NULL"
)
_BULK_UPDATE_TASKS = (
    "UPDATE tasks SET gen = v.column1, state = v.column2, attempt = v.column3, due_ms = v.column4, "
    "updated_ms = v.column5, last_error = v.column6 FROM (VALUES {values}) AS v "
    "WHERE tasks.rowid = v.column7"
)
_BULK_INSERT_ENDED = (
    "INSERT INTO ended (due_ms, task_rowid, state, updated_ms, last_error) "
    "SELECT * FROM (VALUES {values}) WHERE column1 IS NOT NULL"
)
_DEAD_DUE_IN_BUCKET = f"""
SELECT d.task_rowid, d.gen FROM due AS d LEFT JOIN tasks AS t ON t.rowid = d.task_rowid
WHERE d.shard = ? AND d.bucket = ? AND (d.task_rowid, d.gen) > (?, ?)
  AND NOT (t.gen IS NOT NULL AND t.gen = d.gen AND {_LIVE})
ORDER BY d.task_rowid, d.gen LIMIT ?
"""

_STATES = {int(s): s for s in TaskState}
_LEASE, _SUCCEED, _FAIL = TransitionKind.LEASE, TransitionKind.SUCCEED, TransitionKind.FAIL
_RESCHEDULING = frozenset({TransitionKind.LEASE, TransitionKind.RETRY})
_ENDING = {
    TransitionKind.SUCCEED: int(TaskState.SUCCEEDED),
    TransitionKind.FAIL: int(TaskState.FAILED),
}
_TERMINAL = frozenset(int(s) for s in TERMINAL_STATES)
_SYNCHRONOUS = ("normal", "full", "extra")
_CACHE_KIB = 65536  # a connection's page cache, 64 MiB: the random task-id index stays hot
# Checkpoints (copying the WAL back into the database file) run on their own thread, so a
# commit returns as soon as it is in the WAL. A checkpoint copies each page once however often
# it changed since the last one, so one every quarter second writes far less than SQLite's
# default (one per 4 MiB of WAL, run by the committing writer).
_CHECKPOINT_EVERY_S = 0.25
_WAL_AUTOCHECKPOINT_PAGES = 100_000  # the writer checkpoints itself only if that thread lags
_WAL_RESTART_PAGES = 32_768  # past ~128 MiB, make the writer pause so the WAL can start over
_WAL_KEEP_BYTES = 64 << 20  # a restarted WAL file is truncated back to this
_PURGE_CHUNK = 2000  # due rows deleted per transaction, so purging never stalls inserts for long
_PURGE_MARGIN_MS = 10 * BUCKET_MS  # how far behind the slowest checkpoint purging stays
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


def _start_store_thread(label: str, nice: int) -> None:
    """Run first on each of the store's threads. On Linux it names the thread ``label`` (at
    most 15 characters) where top -H, ps -L and perf show it, instead of the process's name
    on every thread, and gives it ``nice`` more than the process's niceness (per thread on
    Linux), so a busy core runs the event loop before the store's threads."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        with open(f"/proc/self/task/{tid}/comm", "w") as comm:
            comm.write(label)
    except OSError as e:
        log.debug("store thread keeps its name: %s", e)
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError as e:
            log.warning("store thread keeps its priority: %s", e)


def _far_from_ms() -> int:
    """Where ``due_far`` starts for a task inserted now: the first far bucket that starts at
    least PROMOTE_LEAD_MS ahead, one the promoter has not moved yet. Tasks due before it go
    straight to ``due``."""
    return -(-(now_ms() + PROMOTE_LEAD_MS) // FAR_BUCKET_MS) * FAR_BUCKET_MS


def _encode_headers(headers: Mapping[str, str]) -> str:
    return _encode_json(headers) if headers else ""


def _decode_headers(text: str) -> dict[str, str]:
    return _decode_json(text) if text else {}


def _last(row: tuple) -> Any:
    return row[-1]


# A task's row, in _TASK_COLUMNS order (TaskRecord's fields), as its record: built without
# TaskRecord's Python __init__ and out of the cyclic GC's view (core.RecordShape), by the
# compiled reader for load_due and by _record for the other reads.
_TASK_RECORD = RecordShape(
    TaskRecord, _TASK_COLUMNS.split(", "),
    [_STATES if name == "state" else _decode_headers if name == "headers" else None
     for name in _TASK_COLUMNS.split(", ")],
)
_record: Callable[[Sequence[Any]], TaskRecord] = _TASK_RECORD.build


class SqliteStore(Store):
    """The embedded store. ``path`` is the database file (created with its directory if missing).

    ``num_shards`` is fixed when the file is created; opening it with another count fails.
    ``synchronous``: "normal" (survives process crashes) or "full"/"extra" (also power loss).
    ``busy_timeout_ms``: how long a write waits for another process's write before failing.
    ``purge_every_s``: how often saving checkpoints also starts a purge of dead due rows
    (0: never; then call ``purge`` yourself).
    ``promote_every_s``: how often inserting or saving checkpoints also starts moving the far
    buckets that come within PROMOTE_LEAD_MS into ``due`` (0: never; then call ``promote``
    yourself; reads are right either way, only slower on rows not moved).
    ``thread_nice``: how much lower than the process the store's threads run (Linux niceness,
    0-19), so that on busy cores the event loop runs first (see _start_store_thread).
    Options may arrive as strings (they come from the store URL's query).
    """

    ordered_apply_depth = 2  # writes run one at a time, in order, on the writer thread

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_shards: int | str = 16,
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
        self.num_shards = int(num_shards)
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, not {self.num_shards}")
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
        self._checkpointer: _Checkpointer | None = None
        self._purging = _Every(self.purge_every_s)
        self._promoting = _Every(self.promote_every_s)

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        nice = self.thread_nice
        writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="taskwheel-sqlite-w", initializer=_start_store_thread,
            initargs=("tw-sqlite-write", nice),
        )
        reader = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="taskwheel-sqlite-r", initializer=_start_store_thread,
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
        self._checkpointer = _Checkpointer(
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
                # A checkpoint copies each page once however often it changed since the last one,
                # so fewer, larger checkpoints write far less than SQLite's default of 4 MiB.
                conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
                conn.execute(f"PRAGMA journal_size_limit = {_WAL_KEEP_BYTES}")
            return conn
        except sqlite3.Error as e:
            raise StoreUnavailable(f"{self.description}: cannot open: {e}") from e

    def _open_due_reader(self) -> SqliteReader:
        try:
            return SqliteReader(self.path, _SELECT_DUE, self.busy_timeout_ms, _CACHE_KIB)
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
            with _transaction(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not meta:
                    meta = {
                        "created_ms": now_ms(),
                        "num_shards": self.num_shards,
                        "schema_version": SCHEMA_VERSION,
                    }
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                    conn.executemany(
                        "INSERT INTO state_counts VALUES (?, 0)", [(int(s),) for s in TaskState]
                    )
                elif meta["schema_version"] in _UPGRADES:
                    _UPGRADES[meta["schema_version"]](conn)
                    meta["schema_version"] = SCHEMA_VERSION
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

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is outside 0..{self.num_shards - 1}")

    # ---- writes ------------------------------------------------------------------------------

    async def insert(self, tasks: Sequence[TaskRecord]) -> list[InsertOutcome]:
        if not tasks:
            return []
        outcomes = await self._write(self._insert, tasks)
        self._promote_soon()
        return outcomes

    def _insert(self, tasks: Sequence[TaskRecord]) -> list[InsertOutcome]:
        n_shards = self.num_shards
        scheduled = int(TaskState.SCHEDULED)
        rows = []
        for t in tasks:
            if not 0 <= t.shard < n_shards:
                raise ValueError(f"task {t.task_id}: shard {t.shard} outside 0..{n_shards - 1}")
            rows.append((
                t.task_id, t.shard, t.queue, t.payload, t.fire_at_ms, t.due_ms, t.attempt,
                t.max_attempts, _encode_headers(t.headers) if t.headers else "",
                t.idempotency_key, t.lease_ms, t.traceparent, t.created_ms, t.updated_ms,
                t.last_error,
            ))
        conn = self._conn_w()
        with _transaction(conn):
            # Rowids grow, and this transaction holds the write lock: every task row it adds
            # lies above this mark, so one INSERT ... SELECT writes their due rows in C.
            mark = conn.execute("SELECT coalesce(max(rowid), 0) FROM tasks").fetchone()[0]
            # Optimistic: the whole batch at once, skipping any row whose id or key is taken.
            # Only when a row was skipped is the batch redone row by row to learn which task
            # holds what; batches without duplicates never pay for the lookups.
            conn.execute("SAVEPOINT batch")
            changes = conn.total_changes
            _insert_tasks.run(conn, rows)
            if conn.total_changes - changes == len(rows):
                outcomes = [InsertOutcome(t.task_id) for t in tasks]
            else:
                conn.execute("ROLLBACK TO batch")
                outcomes = self._insert_one_by_one(conn, tasks, rows)
            conn.execute("RELEASE batch")
            far_from = _far_from_ms()
            added = (conn.execute(_COPY_DUE_ROWS, (mark, far_from)).rowcount
                     + conn.execute(_COPY_DUE_FAR_ROWS, (mark, far_from)).rowcount)
            conn.execute(_ADD_COUNT, (added, scheduled))
        return outcomes

    @staticmethod
    def _insert_one_by_one(
        conn: sqlite3.Connection, tasks: Sequence[TaskRecord], rows: list
    ) -> list[InsertOutcome]:
        # A task whose (queue, key) or id is taken is not stored; its outcome names the task that
        # holds it. In order, so the first of two tasks with one key in this batch wins.
        outcomes = []
        for t, row in zip(tasks, rows):
            if conn.execute(_INSERT_TASK_UNLESS_TAKEN, row).rowcount == 1:
                outcomes.append(InsertOutcome(t.task_id))
                continue
            holder = None
            if t.idempotency_key:
                holder = conn.execute(
                    "SELECT task_id FROM tasks WHERE queue = ? AND idempotency_key = ? "
                    "AND idempotency_key != ''",
                    (t.queue, t.idempotency_key),
                ).fetchone()
            # Otherwise the id itself is taken (an insert retried after an error, say).
            outcomes.append(InsertOutcome(holder[0] if holder else t.task_id, duplicate=True))
        return outcomes

    async def cancel(self, task_id: str, now_ms: int) -> TaskRecord | None:
        return await self._write(self._cancel, task_id, now_ms)

    def _cancel(self, task_id: str, now_ms: int) -> TaskRecord | None:
        conn = self._conn_w()
        with _transaction(conn):
            row = conn.execute(_SELECT_TASK, (task_id,)).fetchone()
            if row is None:
                return None
            record = _record(row)
            if record.state in TERMINAL_STATES:
                raise AlreadyEnded(record)
            conn.execute(
                "UPDATE tasks SET state = ?, updated_ms = ? WHERE task_id = ?",
                (int(TaskState.CANCELLED), now_ms, task_id),
            )
            conn.execute(_ADD_COUNT, (-1, int(record.state)))
            conn.execute(_ADD_COUNT, (1, int(TaskState.CANCELLED)))
        record.state = TaskState.CANCELLED
        record.updated_ms = now_ms
        return record

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
        # SQL (see _FIND_SUCCEEDING), which runs without the GIL the event loop needs; the rest
        # in order, in Python. The two parts name different tasks, so neither sees the other's
        # effects, and one transaction holds both.
        named = collections.Counter(t.task_id for t in transitions)
        once = [t.kind is _SUCCEED and named[t.task_id] == 1 for t in transitions]
        conn = self._conn_w()
        with _transaction(conn):
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
        keys, rowids, scheduled, leased = conn.execute(_FIND_SUCCEEDING, (
            _encode_json([t.task_id for t in transitions]),
            _encode_json([t.expected_gen for t in transitions]),
        )).fetchone()
        applied = [False] * len(transitions)
        for key in _decode_json(keys):
            applied[key] = True
        if scheduled or leased:
            conn.execute(_INSERT_SUCCEEDED, (now_ms, rowids))
            conn.executemany(_ADD_COUNT, [
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
        # statement step for all of them (see _Bulk for why steps are counted).
        found = conn.execute(
            _SELECT_CURRENT, (_encode_json(list({t.task_id: None for t in transitions})),)
        ).fetchone()[0]
        current: dict[str, list] = {row[0]: row[1:] for row in _decode_json(found)}
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
            _update_tasks.run(conn, sorted(updates.values(), key=_last))
            _insert_due.run(conn, due_rows)
            _insert_ended.run(conn, sorted(ended))
            conn.executemany(
                _ADD_COUNT, [(n, state) for state, n in count_changes.items() if n]
            )
        return applied

    async def save_checkpoints(self, checkpoints: Mapping[int, int]) -> None:
        for shard in checkpoints:
            self._check_shard(shard)
        if checkpoints:
            await self._write(self._save_checkpoints, dict(checkpoints))
            self._purge_soon()
            self._promote_soon()

    def _save_checkpoints(self, checkpoints: dict[int, int]) -> None:
        conn = self._conn_w()
        with _transaction(conn):
            # The unsaved default is the creation time, so nothing below it is ever stored either.
            conn.executemany(
                "INSERT INTO checkpoints (shard, ms) VALUES (?, max(?, ?)) "
                "ON CONFLICT (shard) DO UPDATE SET ms = max(ms, excluded.ms)",
                [(shard, ms, self.created_ms) for shard, ms in checkpoints.items()],
            )

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
        with _transaction(conn):
            bucket = conn.execute("SELECT min(far_bucket) FROM due_far").fetchone()[0]
            if bucket is None or bucket > last_bucket:
                return 0
            end = conn.execute(_PROMOTE_CHUNK_END, (bucket, _PROMOTE_CHUNK)).fetchone()[0]
            moved = conn.execute(_PROMOTE_ROWS, (bucket, end)).rowcount
            conn.execute(_DELETE_PROMOTED, (bucket, end))
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
        row = self._conn_r().execute(
            "SELECT min(bucket) FROM due WHERE shard = ? AND bucket >= ? AND bucket < ?",
            (shard, lowest, end),
        ).fetchone()
        return row[0]

    def _dead_due_rows(self, shard: int, bucket: int, after: tuple[int, int]) -> list[tuple[int, int]]:
        """(task_rowid, gen) of up to _PURGE_CHUNK dead rows of a partition, after ``after``."""
        return self._conn_r().execute(
            _DEAD_DUE_IN_BUCKET, (shard, bucket, *after, _PURGE_CHUNK)
        ).fetchall()

    def _delete_due_rows(self, shard: int, bucket: int, dead: list[tuple[int, int]]) -> None:
        conn = self._conn_w()
        with _transaction(conn):
            conn.executemany(
                "DELETE FROM due WHERE shard = ? AND bucket = ? AND task_rowid = ? AND gen = ?",
                [(shard, bucket, rowid, gen) for rowid, gen in dead],
            )

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._read(self._get, task_id)

    def _get(self, task_id: str) -> TaskRecord | None:
        row = self._conn_r().execute(_SELECT_TASK, (task_id,)).fetchone()
        return None if row is None else _record(row)

    async def load_due(self, shard: int, from_ms: int, to_ms: int) -> list[TaskRecord]:
        self._check_shard(shard)
        if to_ms <= from_ms:
            return []
        return await self._read(self._load_due, shard, from_ms, to_ms)

    def _load_due(self, shard: int, from_ms: int, to_ms: int) -> list[TaskRecord]:
        params = (shard, bucket_of(from_ms), bucket_of(to_ms - 1), from_ms, to_ms,
                  from_ms // FAR_BUCKET_MS, (to_ms - 1) // FAR_BUCKET_MS)
        if self._due_reader is not None:
            return self._due_reader.records(params, _TASK_RECORD)
        rows = _decode_json(self._conn_r().execute(_SELECT_DUE_JSON, params).fetchone()[0])
        for row in rows:
            row[3] = bytes.fromhex(row[3])
        return [_record(row) for row in rows]

    async def load_checkpoint(self, shard: int) -> int:
        self._check_shard(shard)
        return await self._read(self._load_checkpoint, shard)

    def _load_checkpoint(self, shard: int) -> int:
        row = self._conn_r().execute(
            "SELECT ms FROM checkpoints WHERE shard = ?", (shard,)
        ).fetchone()
        return self.created_ms if row is None else row[0]

    async def counts(self) -> dict[TaskState, int]:
        return await self._read(self._counts)

    def _counts(self) -> dict[TaskState, int]:
        rows = self._conn_r().execute("SELECT state, n FROM state_counts").fetchall()
        return {_STATES[state]: n for state, n in rows}

    def _conn_w(self) -> sqlite3.Connection:
        assert self._wconn is not None
        return self._wconn

    def _conn_r(self) -> sqlite3.Connection:
        assert self._rconn is not None
        return self._rconn


class _Every:
    """A background job the store's own calls start: at most once per ``every_s`` (0: never),
    and never while the last one still runs."""

    __slots__ = ("every_s", "task", "_next_at")

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.task: asyncio.Task | None = None
        self._next_at = 0.0

    def start(self, job: Callable[[], Any]) -> None:
        if not self.every_s or (self.task is not None and not self.task.done()):
            return
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + self.every_s
        self.task = asyncio.get_running_loop().create_task(job())

    async def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


class _Bulk:
    """Writes many rows with a few statements: each binds a VALUES list of a fixed number of
    rows (16 or 256, so both stay in the statement cache), the last one padded with NULL rows
    that the statement's WHERE drops.

    Why not executemany: Python's sqlite3 lets go of the GIL around every sqlite3_step and
    must win it back after, which takes a switch interval whenever the event loop is busy.
    executemany steps once per row, so 4,000 rows written beside a busy thread took 465 us
    each instead of 3 (SQLite 3.40, CPython 3.11, 1 ms switch interval); 256 rows per
    statement step 16 times for the same 4,000.
    """

    __slots__ = ("_sql", "_pad")

    def __init__(self, template: str, columns: int):
        row = "(" + ",".join("?" * columns) + ")"
        self._sql = {n: template.format(values=",".join([row] * n)) for n in _BULK_ROWS}
        self._pad = (None,) * columns

    def run(self, conn: sqlite3.Connection, rows: Sequence[tuple]) -> None:
        start, count = 0, len(rows)
        while start < count:
            left = count - start
            size = next((n for n in _BULK_ROWS if n >= left), _BULK_ROWS[-1])
            part = rows[start:start + size]
            params = list(itertools.chain.from_iterable(part))
            if len(part) < size:
                params += self._pad * (size - len(part))
            conn.execute(self._sql[size], params)
            start += size


_BULK_ROWS = (16, 256)
_insert_tasks = _Bulk(_BULK_INSERT_TASKS, 15)
_insert_due = _Bulk(_BULK_INSERT_DUE, 5)
_update_tasks = _Bulk(_BULK_UPDATE_TASKS, 7)
_insert_ended = _Bulk(_BULK_INSERT_ENDED, 5)


def _upgrade_from_1(conn: sqlite3.Connection) -> None:
    """Version 1 had no ``ended`` table (the schema above creates it as version 4 has it), and
    its due rows carried a copy of their task's fields; version 2's hold the task's rowid."""
    conn.execute("ALTER TABLE due RENAME TO due_v1")
    conn.execute("DROP INDEX due_partition")
    conn.execute(_creating("due"))
    conn.execute(
        f"INSERT INTO due ({_DUE_COLUMNS}) SELECT d.shard, d.bucket, d.due_ms, d.gen, t.rowid "
        "FROM due_v1 AS d JOIN tasks AS t ON t.task_id = d.task_id"
    )
    conn.execute("DROP TABLE due_v1")
    _upgraded(conn, 1)


def _upgrade_from_2(conn: sqlite3.Connection) -> None:
    """Version 2 keyed ``ended`` by the task's rowid alone (the schema above left that table
    as it was); version 4 by the due time it ended at first."""
    conn.execute("ALTER TABLE ended RENAME TO ended_v2")
    conn.execute(_creating("ended"))
    conn.execute(
        "INSERT INTO ended (due_ms, task_rowid, state, updated_ms, last_error) "
        "SELECT t.due_ms, e.task_rowid, e.state, e.updated_ms, e.last_error "
        "FROM ended_v2 AS e JOIN tasks AS t ON t.rowid = e.task_rowid ORDER BY 1, 2"
    )
    conn.execute("DROP TABLE ended_v2")
    _upgraded(conn, 2)


def _upgraded(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
    log.info("upgraded the embedded store's schema from version %d to %d", version, SCHEMA_VERSION)


def _upgrade_from_4(conn: sqlite3.Connection) -> None:
    """Version 4 had no ``due_far`` (the schema above creates it empty): its due rows all stay
    in ``due``, where they are read as before."""
    _upgraded(conn, 4)


_UPGRADES = {1: _upgrade_from_1, 2: _upgrade_from_2, 4: _upgrade_from_4}


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. IMMEDIATE takes the write lock up
    front, so a read-then-write (apply, cancel) cannot be overtaken by another process."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (it does on some I/O errors)


class _Checkpointer:
    """A thread that copies committed WAL pages into the database file, a few times a second
    while writes come in and not at all while none do."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], description: str, nice: int):
        self._connect = connect
        self._description = description
        self._nice = nice
        self._written = threading.Event()
        self._stopping = threading.Event()
        self.restart_wanted = False
        self._thread = threading.Thread(
            target=self._run, name="taskwheel-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self._written.set()

    def restart_if_wanted(self, writer: sqlite3.Connection) -> None:
        """Called by the writer between transactions. PASSIVE checkpoints copy up to the last
        commit but cannot rewind a WAL that is written without pause; only a checkpoint that
        holds off writers can. The writer runs it itself, between two of its own transactions,
        so there is no writer to wait for, and the copying is mostly done already."""
        if self.restart_wanted:
            try:
                busy, _, _ = writer.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                self.restart_wanted = bool(busy)  # readers in the way: try after the next write
            except sqlite3.Error as e:
                log.warning("%s: checkpoint failed: %s", self._description, e)

    def stop(self) -> None:
        self._stopping.set()
        self._written.set()
        self._thread.join()

    def _run(self) -> None:
        _start_store_thread("tw-sqlite-ckpt", self._nice)
        try:
            conn = self._connect()
        except StoreUnavailable as e:
            log.warning("%s: no background checkpoints: %s", self._description, e)
            return
        try:
            # Checked at the top as well: a stop() landing between the wait below timing out
            # and the clear has its wake-up cleared, and would leave this thread waiting for a
            # write that never comes (close() then hung in join).
            while not self._stopping.is_set():
                self._written.wait()
                if self._stopping.wait(_CHECKPOINT_EVERY_S):
                    return
                self._written.clear()
                try:
                    _, wal_pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.restart_wanted = wal_pages > _WAL_RESTART_PAGES
                except sqlite3.Error as e:
                    log.warning("%s: checkpoint failed: %s", self._description, e)
        finally:
            conn.close()
