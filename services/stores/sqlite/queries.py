"""Every SQL statement the embedded store runs on its tables (store.py explains them), and the
two ways it runs them: ``transaction`` and ``Bulk``. The task column lists come from
columns.py, that is from TaskRecord's declaration."""
from __future__ import annotations

import itertools
import sqlite3
from typing import Sequence

from taskwheel.core import BUCKET_MS
from taskwheel.stores.sqlite.columns import BLOB_FIELDS, INSERTED_FIELDS, TASK_COLUMNS, new_task_values
from taskwheel.task import FIELDS, TaskState

DUE_COLUMNS = "shard, bucket, due_ms, gen, task_rowid"
ENDED_COLUMNS = "due_ms, task_rowid, state, updated_ms, last_error"
# What an ended row lays over its task row.
_ENDED_FIELDS = ("state", "updated_ms", "last_error")
# What a due row read with its task takes from the due row rather than the task row.
_DUE_ROW_FIELDS = ("due_ms", "gen")


def _floor_div_sql(column: str, divisor: int) -> str:
    # SQLite's integer division truncates toward zero; buckets are floor(due_ms / size).
    return f"CASE WHEN {column} >= 0 THEN {column} / {divisor} ELSE -((-{column} + {divisor - 1}) / {divisor}) END"


_BUCKET_SQL = _floor_div_sql("due_ms", BUCKET_MS)
# A far bucket is FAR_BUCKET_MS of due times, every shard's: an hour of them is 12 insertion
# points in due_far, where ``due`` has 16 x 60.
FAR_BUCKET_MS = 5 * BUCKET_MS
_FAR_BUCKET_SQL = _floor_div_sql("due_ms", FAR_BUCKET_MS)

# ---- inserting tasks ----------------------------------------------------------------------

INSERT_TASK_UNLESS_TAKEN = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({new_task_values()}) ON CONFLICT DO NOTHING"
)
SELECT_KEY_HOLDER = (
    "SELECT task_id FROM tasks WHERE queue = ? AND idempotency_key = ? AND idempotency_key != ''"
)
MAX_TASK_ROWID = "SELECT coalesce(max(rowid), 0) FROM tasks"
# A new task's due row goes to ``due`` when it is due before ?2, the start of the first far
# bucket the promoter has not reached, and to ``due_far`` otherwise.
COPY_DUE_ROWS = f"""
INSERT INTO due ({DUE_COLUMNS})
SELECT shard, {_BUCKET_SQL}, due_ms, gen, rowid FROM tasks WHERE rowid > ?1 AND due_ms < ?2
"""
COPY_DUE_FAR_ROWS = f"""
INSERT INTO due_far (far_bucket, task_rowid, gen, shard, due_ms)
SELECT {_FAR_BUCKET_SQL}, rowid, gen, shard, due_ms FROM tasks WHERE rowid > ?1 AND due_ms >= ?2
"""

# ---- promoting far due rows ---------------------------------------------------------------

FIRST_FAR_BUCKET = "SELECT min(far_bucket) FROM due_far"
# One chunk of a far bucket's rows, in insertion order: ?1 the far bucket, ?2 the last task
# rowid of the chunk. Copied into ``due`` sorted by its key, so each partition's rows are
# written as one run, then deleted from ``due_far`` as one range.
PROMOTE_CHUNK_END = (
    "SELECT max(task_rowid) FROM "
    "(SELECT task_rowid FROM due_far WHERE far_bucket = ?1 ORDER BY task_rowid LIMIT ?2)"
)
PROMOTE_ROWS = f"""
INSERT INTO due ({DUE_COLUMNS})
SELECT shard, {_BUCKET_SQL}, due_ms, gen, task_rowid FROM due_far
WHERE far_bucket = ?1 AND task_rowid <= ?2
ORDER BY 1, 2, 5, 4
"""
DELETE_PROMOTED = "DELETE FROM due_far WHERE far_bucket = ?1 AND task_rowid <= ?2"

# ---- reading tasks ------------------------------------------------------------------------

# A task's ended row, if any: keyed by the due time of the row it ended at, which stays the
# task row's due_ms (an ended task's row is never updated again).
_ENDED_OF_T = "e.due_ms = t.due_ms AND e.task_rowid = t.rowid"
# A task row with its ended row, if any, laid over it.
_TASK_WITH_END = ", ".join(
    f"coalesce(e.{name}, t.{name})" if name in _ENDED_FIELDS else f"t.{name}" for name in FIELDS
)
SELECT_TASK = (
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
_DUE_RECORD_COLUMNS = "\nSELECT " + ", ".join(
    f"d.{name}" if name in _DUE_ROW_FIELDS else f"t.{name}" for name in FIELDS
)
SELECT_DUE = f"""{_DUE_RECORD_COLUMNS}
FROM due AS d JOIN tasks AS t ON t.rowid = d.task_rowid
WHERE d.shard = ?1 AND d.bucket >= ?2 AND d.bucket <= ?3 AND d.due_ms >= ?4 AND d.due_ms < ?5
  AND d.gen = t.gen AND {_LIVE}
UNION ALL{_DUE_RECORD_COLUMNS}
FROM due_far AS d JOIN tasks AS t ON t.rowid = d.task_rowid
WHERE d.far_bucket >= ?6 AND d.far_bucket <= ?7 AND d.shard = ?1 AND d.due_ms >= ?4
  AND d.due_ms < ?5 AND d.gen = t.gen AND {_LIVE}
"""
# The same rows as one JSON array, in one statement step (see Bulk for why steps are counted),
# for a Python whose sqlite3 module has its own copy of SQLite, where the core's SqliteReader,
# which reads SELECT_DUE without the GIL, must not be used. Blobs travel as hex.
_DUE_RECORD_JSON = ", ".join(f"hex({name})" if name in BLOB_FIELDS else name for name in FIELDS)
SELECT_DUE_JSON = f"""
SELECT json_group_array(json_array({_DUE_RECORD_JSON}))
FROM ({SELECT_DUE})
"""
SELECT_CHECKPOINT = "SELECT ms FROM checkpoints WHERE shard = ?"
# Every shard's lease and checkpoint, ?1 the number of shards, ?2 the store's creation time
# (the checkpoint of a shard that never saved one).
SELECT_SHARD_LEASES = """
WITH RECURSIVE shards(shard) AS (SELECT 0 UNION ALL SELECT shard + 1 FROM shards WHERE shard + 1 < ?1)
SELECT s.shard, coalesce(l.owner, ''), coalesce(l.epoch, 0), coalesce(l.expires_ms, 0), coalesce(c.ms, ?2)
FROM shards AS s LEFT JOIN shard_leases AS l ON l.shard = s.shard
LEFT JOIN checkpoints AS c ON c.shard = s.shard
ORDER BY s.shard
"""
SELECT_MEMBERS = (
    "SELECT node_id, address, roles, queues, started_ms, expires_ms FROM members "
    "WHERE expires_ms > ? ORDER BY node_id"
)
SELECT_COUNTS = "SELECT state, n FROM state_counts"

# ---- changing tasks -----------------------------------------------------------------------

ADD_COUNT = "UPDATE state_counts SET n = n + ? WHERE state = ?"
CANCEL_TASK = "UPDATE tasks SET state = ?, updated_ms = ? WHERE task_id = ?"
# The current state of the tasks named in a JSON array, as one JSON array of rows.
SELECT_CURRENT = (
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
FIND_SUCCEEDING = f"""
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
INSERT_SUCCEEDED = (
    f"INSERT INTO ended ({ENDED_COLUMNS}) "
    f"SELECT t.due_ms, t.rowid, {int(TaskState.SUCCEEDED)}, ?, t.last_error "
    "FROM json_each(?) AS j JOIN tasks AS t ON t.rowid = j.value"
)
# A lease changes only from the owner and epoch its writer read: ?4 and ?5 (a shard never
# owned has no row, read as owner '' at epoch 0).
TAKE_SHARD = (
    "INSERT INTO shard_leases (shard, owner, epoch, expires_ms) VALUES (?1, ?2, ?5 + 1, ?3) "
    "ON CONFLICT (shard) DO UPDATE SET owner = ?2, epoch = ?5 + 1, expires_ms = ?3 "
    "WHERE owner = ?4 AND epoch = ?5"
)
SELECT_LEASE = "SELECT owner, epoch FROM shard_leases WHERE shard = ?"
RENEW_SHARD = "UPDATE shard_leases SET expires_ms = ? WHERE shard = ? AND owner = ? AND epoch = ?"
RELEASE_SHARD = "UPDATE shard_leases SET owner = '', expires_ms = 0 WHERE shard = ? AND owner = ? AND epoch = ?"
SAVE_MEMBER = (
    "INSERT INTO members (node_id, address, roles, queues, started_ms, expires_ms) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, "
    "roles = excluded.roles, queues = excluded.queues, started_ms = excluded.started_ms, "
    "expires_ms = excluded.expires_ms"
)
DELETE_MEMBER = "DELETE FROM members WHERE node_id = ?"
# Members lapsed this long ago are forgotten (a heartbeat deletes them).
DELETE_LAPSED_MEMBERS = "DELETE FROM members WHERE expires_ms < ?"
SAVE_CHECKPOINT = (
    "INSERT INTO checkpoints (shard, ms) VALUES (?, max(?, ?)) "
    "ON CONFLICT (shard) DO UPDATE SET ms = max(ms, excluded.ms)"
)

# ---- purging dead due rows ----------------------------------------------------------------

NEXT_BUCKET = "SELECT min(bucket) FROM due WHERE shard = ? AND bucket >= ? AND bucket < ?"
DEAD_DUE_IN_BUCKET = f"""
SELECT d.task_rowid, d.gen FROM due AS d LEFT JOIN tasks AS t ON t.rowid = d.task_rowid
WHERE d.shard = ? AND d.bucket = ? AND (d.task_rowid, d.gen) > (?, ?)
  AND NOT (t.gen IS NOT NULL AND t.gen = d.gen AND {_LIVE})
ORDER BY d.task_rowid, d.gen LIMIT ?
"""
DELETE_DUE_ROW = "DELETE FROM due WHERE shard = ? AND bucket = ? AND task_rowid = ? AND gen = ?"


class transaction:
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


class Bulk:
    """Writes many rows with a few statements: each binds a VALUES list of a fixed number of
    rows (16 or 256, so both stay in the statement cache), the last one padded with NULL rows
    that the statement's WHERE drops. In ``template``, {values} becomes that VALUES list, whose
    columns SQLite names column1, column2, ...

    Why not executemany: Python's sqlite3 lets go of the GIL around every sqlite3_step and
    must win it back after, which takes a switch interval whenever the event loop is busy.
    executemany steps once per row: 4,000 rows written beside a busy thread cost 465 us each
    instead of 3. 256 rows a statement step 16 times for the same 4,000.
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
_INSERTED_VALUES = new_task_values([f"column{i}" for i in range(1, len(INSERTED_FIELDS) + 1)])
# Rows of columns.insert_rows.
insert_tasks = Bulk(
    f"INSERT INTO tasks ({TASK_COLUMNS}) SELECT {_INSERTED_VALUES} "
    "FROM (VALUES {values}) WHERE column1 IS NOT NULL ON CONFLICT DO NOTHING",
    len(INSERTED_FIELDS),
)
# (shard, bucket, due_ms, gen, task_rowid)
insert_due = Bulk(
    f"INSERT INTO due ({DUE_COLUMNS}) SELECT * FROM (VALUES {{values}}) WHERE column1 IS NOT NULL",
    5,
)
# (gen, state, attempt, due_ms, updated_ms, last_error, rowid)
update_tasks = Bulk(
    "UPDATE tasks SET gen = v.column1, state = v.column2, attempt = v.column3, due_ms = v.column4, "
    "updated_ms = v.column5, last_error = v.column6 FROM (VALUES {values}) AS v "
    "WHERE tasks.rowid = v.column7",
    7,
)
# (due_ms, task_rowid, state, updated_ms, last_error)
insert_ended = Bulk(
    f"INSERT INTO ended ({ENDED_COLUMNS}) SELECT * FROM (VALUES {{values}}) WHERE column1 IS NOT NULL",
    5,
)
