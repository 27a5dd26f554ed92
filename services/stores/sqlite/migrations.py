"""The embedded store's schema (schema.sql) and the upgrades of older files to it.

Versions: 1 had no ``ended`` table and due rows carrying a copy of their task; 2 added
``ended`` (keyed by the task's rowid) and narrowed ``due`` to the task's rowid, clustered by
partition; 4 keyed ``ended`` by due time; 5 added ``due_far``; 6 added ``shard_leases`` and ``members``.
1, 2, 4 and 5 are upgraded when
opened, in the transaction that opens the file, which holds the write lock about 1.3 s per
million ended tasks. 3, a layout of due rows by second that was reverted, is refused.

An upgrade spells out the columns of the tables as they were, not as TaskRecord has them now.
"""
from __future__ import annotations

import logging
import re
import sqlite3
from importlib import resources
from typing import Callable

from taskwheel.clock import now_ms
from taskwheel.task import TaskState

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
# The current layout: run whole on every open, and table by table by the upgrades.
SCHEMA = resources.files(__package__).joinpath("schema.sql").read_text()


def create_or_upgrade(conn: sqlite3.Connection, num_shards: int) -> dict[str, int]:
    """Creates what is missing of the schema, and upgrades a file of an older version; returns
    the file's meta (created_ms, num_shards, schema_version). For a new file those are now,
    ``num_shards`` and SCHEMA_VERSION. Runs inside the caller's transaction; a version it
    cannot upgrade is left for the caller to refuse."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if not meta:
        meta = {"created_ms": now_ms(), "num_shards": num_shards, "schema_version": SCHEMA_VERSION}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        conn.executemany("INSERT INTO state_counts VALUES (?, 0)", [(int(s),) for s in TaskState])
    elif meta["schema_version"] in _UPGRADES:
        _UPGRADES[meta["schema_version"]](conn)
        meta["schema_version"] = SCHEMA_VERSION
    return meta


def _creating(table: str) -> str:
    """The statement of schema.sql that creates ``table``."""
    for statement in SCHEMA.split(";"):
        if re.search(r"CREATE TABLE IF NOT EXISTS %s \(" % table, statement):
            return statement
    raise KeyError(table)


def _upgrade_from_1(conn: sqlite3.Connection) -> None:
    """Version 1 had no ``ended`` table (the schema creates it as version 4 has it), and its
    due rows carried a copy of their task's fields; version 2's hold the task's rowid."""
    conn.execute("ALTER TABLE due RENAME TO due_v1")
    conn.execute("DROP INDEX due_partition")
    conn.execute(_creating("due"))
    conn.execute(
        "INSERT INTO due (shard, bucket, due_ms, gen, task_rowid) "
        "SELECT d.shard, d.bucket, d.due_ms, d.gen, t.rowid "
        "FROM due_v1 AS d JOIN tasks AS t ON t.task_id = d.task_id"
    )
    conn.execute("DROP TABLE due_v1")
    _upgraded(conn, 1)


def _upgrade_from_2(conn: sqlite3.Connection) -> None:
    """Version 2 keyed ``ended`` by the task's rowid alone (the schema left that table as it
    was); version 4 by the due time it ended at first."""
    conn.execute("ALTER TABLE ended RENAME TO ended_v2")
    conn.execute(_creating("ended"))
    conn.execute(
        "INSERT INTO ended (due_ms, task_rowid, state, updated_ms, last_error) "
        "SELECT t.due_ms, e.task_rowid, e.state, e.updated_ms, e.last_error "
        "FROM ended_v2 AS e JOIN tasks AS t ON t.rowid = e.task_rowid ORDER BY 1, 2"
    )
    conn.execute("DROP TABLE ended_v2")
    _upgraded(conn, 2)


def _upgrade_from_4(conn: sqlite3.Connection) -> None:
    """Version 4 had no ``due_far`` (the schema creates it empty): its due rows all stay in
    ``due``, where they are read as before."""
    _upgraded(conn, 4)


def _upgrade_from_5(conn: sqlite3.Connection) -> None:
    """Version 5 had no ``shard_leases`` or ``members`` (the schema creates them empty): no
    shard has an owner yet, and the checkpoints stay where they were."""
    _upgraded(conn, 5)


def _upgraded(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
    log.info("upgraded the embedded store's schema from version %d to %d", version, SCHEMA_VERSION)


_UPGRADES: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _upgrade_from_1, 2: _upgrade_from_2, 4: _upgrade_from_4, 5: _upgrade_from_5,
}
