"""The embedded store: the store contract, plus what only SQLite has (files, locks, purging)."""
import asyncio
import gc
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from taskwheel.stores import open_store
from taskwheel.core import BUCKET_MS
from taskwheel.stores.base import StoreUnavailable, Transition, TransitionKind
from taskwheel.task import TaskState
from taskwheel.stores.sqlite import store as sqlite_store
from taskwheel.stores.sqlite import threads as sqlite_threads
from taskwheel.stores.sqlite import SqliteStore
from tests.services.stores.contract import (
    T0,
    fail,
    StoreContract,
    insert_one,
    lease,
    load,
    new_task,
    opened,
    succeed,
)


class TestSqliteStoreContract(StoreContract):
    @pytest.fixture
    def make_store(self, tmp_path):
        return lambda: SqliteStore(tmp_path / "tasks.db", num_shards=8)


class TestSqliteStoreContractReadingJson(StoreContract):
    """The contract again where Python's sqlite3 has a copy of SQLite of its own, so load_due
    reads one JSON array instead of using the core's SqliteReader."""

    model_examples = 10

    @pytest.fixture
    def make_store(self, tmp_path, monkeypatch):
        monkeypatch.setattr(sqlite_store, "same_sqlite_as_python", lambda: False)
        return lambda: SqliteStore(tmp_path / "tasks.db", num_shards=8)


class TestSqliteStoreContractWithFarRows(StoreContract):
    """The contract again with every new task's due row in ``due_far``, as if all were due
    past the promoter's reach, and nothing promoted: reads take them from there."""

    model_examples = 10

    @pytest.fixture
    def make_store(self, tmp_path, monkeypatch):
        monkeypatch.setattr(sqlite_store, "_far_from_ms", lambda: -(2**62))
        return lambda: SqliteStore(tmp_path / "tasks.db", num_shards=8, promote_every_s=0)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "data" / "tasks.db")


def due_rows_in_file(path, table: str = "due") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ---- files and options ---------------------------------------------------------------------

async def test_opening_with_another_shard_count_is_refused(db):
    async with opened(lambda: SqliteStore(db, num_shards=16)):
        pass
    with pytest.raises(ValueError, match="created with 16 shards.*configured with 8"):
        async with opened(lambda: SqliteStore(db, num_shards=8)):
            pass


async def test_a_version_1_file_is_upgraded_and_keeps_every_task_as_it_was(db):
    waiting, done, leased = (new_task(due_ms=T0 + i) for i in range(3))
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert([waiting, done, leased])
        await store.apply([succeed(done), lease(leased, T0 + 30_000)], now_ms=T0)
    _rewrite_as_version_1(db)
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        assert [(r.task_id, r.gen) for r in await load(store)] == [
            (waiting.task_id, 1), (leased.task_id, 2)]
        assert (await store.get(done.task_id)).state == TaskState.SUCCEEDED
        assert await store.apply([succeed(waiting), succeed(done)], now_ms=T0) == [True, False]
        assert (await store.get(waiting.task_id)).state == TaskState.SUCCEEDED
    assert _schema_version(db) == sqlite_store.SCHEMA_VERSION


async def test_a_version_2_file_is_upgraded_and_keeps_every_task_as_it_was(db):
    waiting, done, failed, leased = (new_task(due_ms=T0 + i) for i in range(4))
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert([waiting, done, failed, leased])
        await store.apply([lease(failed, T0 + 20_000), lease(leased, T0 + 30_000)], now_ms=T0)
        await store.apply([succeed(done), fail(failed, "boom", gen=2)], now_ms=T0 + 5)
    _rewrite_as_version_2(db)
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        assert [(r.task_id, r.gen) for r in await load(store)] == [
            (waiting.task_id, 1), (leased.task_id, 2)]
        got_done, got_failed = await store.get(done.task_id), await store.get(failed.task_id)
        assert (got_done.state, got_done.updated_ms) == (TaskState.SUCCEEDED, T0 + 5)
        assert (got_failed.state, got_failed.last_error) == (TaskState.FAILED, "boom")
        assert await store.apply([succeed(done), fail(failed, "again", gen=2),
                                  succeed(leased, gen=2)], now_ms=T0) == [False, False, True]
        assert (await store.get(leased.task_id)).state == TaskState.SUCCEEDED
        assert await load(store) == [await store.get(waiting.task_id)]
    assert _schema_version(db) == sqlite_store.SCHEMA_VERSION


async def test_a_version_4_file_gets_an_empty_due_far_and_reads_its_due_rows_as_before(db):
    tasks = [new_task(shard=i % 4, due_ms=T0 + i * 1_000) for i in range(8)]
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert(tasks)
        await store.apply([succeed(tasks[0])], now_ms=T0)
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE due_far")
        conn.execute("UPDATE meta SET value = 4 WHERE key = 'schema_version'")
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        loaded = [r for s in range(4) for r in await load(store, shard=s)]
        assert sorted(r.task_id for r in loaded) == sorted(t.task_id for t in tasks[1:])
    assert _schema_version(db) == sqlite_store.SCHEMA_VERSION
    assert due_rows_in_file(db, "due_far") == 0


async def test_a_version_5_file_gets_unowned_shards_that_keep_their_checkpoints(db):
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        created = store.created_ms
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE shard_leases")
        conn.execute("DROP TABLE members")
        conn.execute("INSERT INTO checkpoints VALUES (2, ?)", (created + 60_000,))
        conn.execute("UPDATE meta SET value = 5 WHERE key = 'schema_version'")
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        leases = await store.shard_leases()
        assert [(lease.owner, lease.epoch, lease.checkpoint_ms) for lease in leases] == [
            ("", 0, created), ("", 0, created), ("", 0, created + 60_000), ("", 0, created)]
        assert await store.members(0) == []
    assert _schema_version(db) == sqlite_store.SCHEMA_VERSION


async def test_a_version_3_file_a_layout_tried_and_reverted_is_refused_by_name(db):
    async with opened(lambda: SqliteStore(db, num_shards=4)):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 3 WHERE key = 'schema_version'")
    refused = f"has schema version 3; this taskwheel reads version {sqlite_store.SCHEMA_VERSION}"
    with pytest.raises(ValueError, match=refused):
        async with opened(lambda: SqliteStore(db, num_shards=4)):
            pass


def _schema_version(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]


def _rewrite_as_version_2(path) -> None:
    """The file as version 2 wrote it: ``ended`` keyed by the task's rowid alone."""
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE ended RENAME TO ended_v3")
        conn.execute("CREATE TABLE ended (task_rowid INTEGER PRIMARY KEY, state INTEGER NOT NULL, "
                     "updated_ms INTEGER NOT NULL, last_error TEXT NOT NULL)")
        conn.execute("INSERT INTO ended SELECT task_rowid, state, updated_ms, last_error FROM ended_v3")
        conn.execute("DROP TABLE ended_v3")
        conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")


def _rewrite_as_version_1(path) -> None:
    """The file as version 1 wrote it: ended tasks' states in their task rows, no ``ended``
    table, due rows carrying a copy of their task's fields instead of its rowid."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tasks SET state = e.state, updated_ms = e.updated_ms, "
                     "last_error = e.last_error FROM ended AS e WHERE e.task_rowid = tasks.rowid")
        conn.execute("DROP TABLE ended")
        conn.execute("ALTER TABLE due RENAME TO due_v2")
        conn.execute("""CREATE TABLE due (
            seq INTEGER PRIMARY KEY, shard INTEGER NOT NULL, bucket INTEGER NOT NULL,
            due_ms INTEGER NOT NULL, task_id TEXT NOT NULL, gen INTEGER NOT NULL,
            queue TEXT NOT NULL, payload BLOB NOT NULL, fire_at_ms INTEGER NOT NULL,
            attempt INTEGER NOT NULL, max_attempts INTEGER NOT NULL, headers TEXT NOT NULL,
            lease_ms INTEGER NOT NULL, traceparent TEXT NOT NULL)""")
        conn.execute("CREATE INDEX due_partition ON due (shard, bucket, seq, due_ms)")
        conn.execute("INSERT INTO due SELECT NULL, d.shard, d.bucket, d.due_ms, t.task_id, d.gen, "
                     "t.queue, t.payload, t.fire_at_ms, t.attempt, t.max_attempts, t.headers, "
                     "t.lease_ms, t.traceparent FROM due_v2 AS d JOIN tasks AS t "
                     "ON t.rowid = d.task_rowid")
        conn.execute("DROP TABLE due_v2")
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")


async def test_database_is_in_wal_mode(db):
    async with opened(lambda: SqliteStore(db, num_shards=4)):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_store_url_options_reach_the_store(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/t.db?synchronous=full&busy_timeout_ms=250&shards=4")
    assert isinstance(store, SqliteStore)
    assert (store.num_shards, store.synchronous, store.busy_timeout_ms) == (4, "full", 250)
    async with opened(lambda: store) as opened_store:
        await insert_one(opened_store, new_task(shard=3))


def test_unknown_url_option_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown SQLite store option.*synchronus"):
        open_store(f"sqlite://{tmp_path}/t.db?synchronus=full")


def test_an_sqlite_too_old_for_the_store_is_named_in_the_error(db, monkeypatch):
    monkeypatch.setattr(sqlite_store.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite_store.sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(RuntimeError, match=r"needs SQLite 3\.38\.0 or newer.*links SQLite 3\.31\.1"):
        SqliteStore(db)


def test_synchronous_off_is_refused(db):
    with pytest.raises(ValueError, match="synchronous='off'"):
        SqliteStore(db, synchronous="off")


async def test_unwritable_location_raises_store_unavailable(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot"):
        async with opened(lambda: SqliteStore(tmp_path / "a-file" / "tasks.db")):
            pass


async def test_calls_on_a_closed_store_raise_store_unavailable(db):
    store = SqliteStore(db, num_shards=4)
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.insert([new_task()])
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get("x")


# ---- what the contract leaves to each store ------------------------------------------------

async def test_reinserting_a_stored_task_id_is_reported_as_duplicate(db):
    task = new_task()
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await insert_one(store, task)
        await store.cancel(task.task_id, now_ms=T0)
        fresh = new_task()
        outcomes = await store.insert([fresh, new_task(task_id=task.task_id, payload=b"again")])
        assert [(o.task_id, o.duplicate) for o in outcomes] == [
            (fresh.task_id, False), (task.task_id, True)
        ]
        stored = await store.get(task.task_id)
        counts = await store.counts()
    assert (stored.state, stored.payload) == (TaskState.CANCELLED, task.payload)
    assert (counts[TaskState.SCHEDULED], counts[TaskState.CANCELLED]) == (1, 1)


async def test_lease_without_the_task_is_refused_before_anything_applies(db):
    a, b = new_task(due_ms=T0), new_task(due_ms=T0 + 1)
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert([a, b])
        bare = Transition(b.task_id, 0, TransitionKind.LEASE, 1, T0 + 1, due_ms=T0 + 30_000,
                          attempt=2)
        with pytest.raises(ValueError, match="carries no task"):
            await store.apply([lease(a, T0 + 30_000), bare], now_ms=T0)
        assert [r.gen for r in await load(store)] == [1, 1]


async def test_task_in_a_shard_the_store_does_not_have_is_refused(db):
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        with pytest.raises(ValueError, match="shard 4"):
            await store.insert([new_task(shard=0), new_task(shard=4)])
        assert (await store.counts())[TaskState.SCHEDULED] == 0


# ---- threads, locks, processes -------------------------------------------------------------

async def test_event_loop_runs_while_a_batch_is_written(db):
    ticks_during_insert = 0
    done = False

    async def tick():
        nonlocal ticks_during_insert
        while not done:
            await asyncio.sleep(0)
            ticks_during_insert += 1

    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        ticker = asyncio.create_task(tick())
        await store.insert([new_task(shard=i % 4, due_ms=T0 + i) for i in range(20_000)])
        done = True
        await ticker
    assert ticks_during_insert > 0


async def test_concurrent_calls_from_one_loop_are_all_stored(db):
    batches = [[new_task(shard=i % 4, due_ms=T0 + i) for i in range(100)] for _ in range(20)]
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await asyncio.gather(*(store.insert(batch) for batch in batches))
        assert (await store.counts())[TaskState.SCHEDULED] == 2_000


async def test_applies_running_at_once_are_applied_in_the_order_they_were_called(db):
    # What ordered_apply_depth promises: a lease and the ack behind it, both in flight.
    assert SqliteStore.ordered_apply_depth > 1
    tasks = [new_task(due_ms=T0 + i) for i in range(500)]
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert(tasks)
        leased, acked = await asyncio.gather(
            store.apply([lease(t, T0 + 30_000) for t in tasks], now_ms=T0),
            store.apply([succeed(t, gen=2) for t in tasks], now_ms=T0),
        )
        assert all(leased) and all(acked)
        assert {(await store.get(t.task_id)).state for t in tasks} == {TaskState.SUCCEEDED}


async def test_two_stores_on_one_file_write_side_by_side(db):
    # As ingest and dispatch do when `taskwheel serve` runs them as separate processes.
    first = [new_task(shard=0, due_ms=T0 + i) for i in range(2_000)]
    second = [new_task(shard=1, due_ms=T0 + i) for i in range(2_000)]
    async with opened(lambda: SqliteStore(db, num_shards=4)) as a:
        async with opened(lambda: SqliteStore(db, num_shards=4)) as b:
            await asyncio.gather(
                *(a.insert(first[i:i + 100]) for i in range(0, 2_000, 100)),
                *(b.insert(second[i:i + 100]) for i in range(0, 2_000, 100)),
            )
            assert len(await load(a, shard=1)) == 2_000
            assert len(await load(b, shard=0)) == 2_000
            assert (await a.counts())[TaskState.SCHEDULED] == 4_000


async def test_write_while_another_process_holds_the_lock_raises_store_unavailable(db):
    async with opened(lambda: SqliteStore(db, num_shards=4, busy_timeout_ms=50)) as store:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.insert([new_task()])
        finally:
            other.execute("ROLLBACK")
            other.close()
        await insert_one(store, new_task())  # usable again once the lock is gone


_INSERTING_CHILD = textwrap.dedent("""
    import asyncio, itertools, sys
    from taskwheel.task import TaskRecord
    from taskwheel.stores.sqlite import SqliteStore

    async def main(path):
        store = SqliteStore(path, num_shards=4)
        await store.open()
        for batch in itertools.count():
            await store.insert([
                TaskRecord(task_id=f"b{batch}-{i}", shard=i % 4, queue="q", payload=b"x" * 200,
                           fire_at_ms=batch, due_ms=batch)
                for i in range(500)
            ])
            print(f"committed {batch}", flush=True)

    asyncio.run(main(sys.argv[1]))
""")


async def test_kill_9_loses_no_batch_that_insert_acknowledged(db):
    os.makedirs(os.path.dirname(db))
    child = subprocess.Popen([sys.executable, "-c", _INSERTING_CHILD, db],
                             stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        while len(lines) < 5:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
            lines.append(line)
    finally:
        child.send_signal(signal.SIGKILL)  # right away: it is usually mid-way through a batch
        lines += child.stdout.readlines()  # every line printed before it died counts
        child.wait()
    committed = {int(line.split()[1]) for line in lines}
    assert child.returncode == -signal.SIGKILL
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        stored = {}
        for shard in range(4):
            for row in await store.load_due(shard, 0, 1_000_000):
                stored[row.due_ms] = stored.get(row.due_ms, 0) + 1
        for batch in committed:
            assert await store.get(f"b{batch}-499") is not None
    assert all(stored.get(batch) == 500 for batch in committed)
    assert set(stored.values()) == {500}  # the batch in flight is there entirely or not at all


def _count_statements(conn: sqlite3.Connection) -> list[str]:
    started: list[str] = []
    conn.set_trace_callback(started.append)  # once per statement run (executemany: per row)
    return started


async def test_a_batch_of_inserts_runs_a_few_statements_not_one_per_row(db):
    # Each statement run lets go of the GIL and waits to win it back (see queries.Bulk).
    tasks = [new_task(due_ms=T0 + i) for i in range(1_000)]
    async with opened(lambda: SqliteStore(db)) as store:
        started = _count_statements(store._wconn)
        await store.insert(tasks)
    assert len(started) <= 15, started


async def test_a_batch_of_transitions_runs_a_few_statements_not_one_per_task(db):
    tasks = [new_task(due_ms=T0 + i) for i in range(1_000)]
    async with opened(lambda: SqliteStore(db)) as store:
        await store.insert(tasks)
        leased = await store.apply([lease(t, T0 + 30_000) for t in tasks], now_ms=T0)
        started = _count_statements(store._wconn)
        ended = await store.apply([succeed(t, gen=2) for t in tasks], now_ms=T0)
    assert all(leased) and all(ended)
    assert len(started) <= 15, started


# ---- far due rows and their promotion -------------------------------------------------------

FAR = sqlite_store.FAR_BUCKET_MS


def _far_from(monkeypatch, ms: int) -> None:
    """New tasks due at ``ms`` or later get their due rows in ``due_far``."""
    monkeypatch.setattr(sqlite_store, "_far_from_ms", lambda: ms)


def _due_rows_by_table(path) -> dict[str, list[tuple[int, int]]]:
    with sqlite3.connect(path) as conn:
        return {table: conn.execute(f"SELECT task_rowid, gen FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("due", "due_far")}


async def _load_all(store, shards: int, from_ms: int, to_ms: int) -> list:
    return sorted([(r.due_ms, r.task_id, r.gen, r.state) for s in range(shards)
                   for r in await store.load_due(s, from_ms, to_ms)])


@pytest.mark.parametrize("core_reader", [True, False], ids=["core-reader", "json"])
async def test_new_tasks_due_past_the_promoters_reach_wait_in_due_far(db, monkeypatch, core_reader):
    monkeypatch.setattr(sqlite_store, "same_sqlite_as_python", lambda: core_reader)
    _far_from(monkeypatch, T0 + FAR)
    near = [new_task(shard=i % 4, due_ms=T0 + FAR - 1 - i) for i in range(3)]
    far = [new_task(shard=i % 4, due_ms=T0 + FAR + i * BUCKET_MS) for i in range(5)]
    async with opened(lambda: SqliteStore(db, num_shards=4, promote_every_s=0)) as store:
        await store.insert(near + far)
        loaded = await _load_all(store, 4, T0, T0 + 2 * FAR)
    assert [task_id for _, task_id, _, _ in loaded] == [t.task_id for t in sorted(
        near + far, key=lambda t: t.due_ms)]
    rows = _due_rows_by_table(db)
    assert (len(rows["due"]), len(rows["due_far"])) == (3, 5)


async def test_promoting_moves_far_rows_and_every_read_stays_the_same(db, monkeypatch):
    _far_from(monkeypatch, T0)
    tasks = [new_task(shard=i % 4, due_ms=T0 + i * 7_001) for i in range(200)]
    async with opened(lambda: SqliteStore(db, num_shards=4, promote_every_s=0)) as store:
        await store.insert(tasks)
        await store.apply([lease(t, T0 + 3 * FAR) for t in tasks[:20]], now_ms=T0)
        await store.apply([succeed(t) for t in tasks[20:40]], now_ms=T0)
        for t in tasks[40:50]:
            await store.cancel(t.task_id, now_ms=T0)
        ranges = [(T0, T0 + 5 * FAR), (T0 + 5_000, T0 + 61_000), (T0 + FAR - 1, T0 + FAR + 1)]
        before = [await _load_all(store, 4, *r) for r in ranges]
        gets = [await store.get(t.task_id) for t in tasks]
        assert await store.promote(before_ms=T0 + 5 * FAR) == 200
        assert [await _load_all(store, 4, *r) for r in ranges] == before
        assert [await store.get(t.task_id) for t in tasks] == gets
        assert len(before[0]) == 170  # 20 succeeded, 10 cancelled; the leased ones' new rows
    rows = _due_rows_by_table(db)
    assert (len(rows["due"]), len(rows["due_far"])) == (220, 0)


async def test_promote_moves_only_the_far_buckets_that_start_before_its_bound(db, monkeypatch):
    f0 = (T0 // FAR + 1) * FAR  # a far bucket's start
    _far_from(monkeypatch, f0)
    tasks = [new_task(due_ms=f0 + k * FAR + 1) for k in range(4)]
    async with opened(lambda: SqliteStore(db, num_shards=4, promote_every_s=0)) as store:
        await store.insert(tasks)
        assert await store.promote(before_ms=f0 + 1) == 1  # the bucket starting at f0
        assert await store.promote(before_ms=f0 + FAR) == 0
        assert await store.promote(before_ms=f0 + FAR + 1) == 1  # starts at f0 + FAR
        assert len(await _load_all(store, 4, f0, f0 + 4 * FAR)) == 4
    assert len(_due_rows_by_table(db)["due_far"]) == 2


async def test_promote_works_through_a_bucket_in_chunks(db, monkeypatch):
    _far_from(monkeypatch, T0)
    monkeypatch.setattr(sqlite_store, "_PROMOTE_CHUNK", 7)
    tasks = [new_task(shard=i % 4, due_ms=T0 + i) for i in range(100)]
    async with opened(lambda: SqliteStore(db, num_shards=4, promote_every_s=0)) as store:
        await store.insert(tasks)
        started = _count_statements(store._wconn)
        assert await store.promote(before_ms=T0 + 1) == 100
        assert sum(s.startswith("INSERT INTO due") for s in map(str.strip, started)) == 15
        assert len(await _load_all(store, 4, T0, T0 + 100)) == 100
    assert len(_due_rows_by_table(db)["due"]) == 100


async def test_inserting_starts_a_promotion_in_the_background(db, monkeypatch):
    _far_from(monkeypatch, T0)  # due in 2023, so its bucket is within any real clock's lead
    async with opened(lambda: SqliteStore(db, num_shards=4, promote_every_s=3600)) as store:
        await store.insert([new_task(due_ms=T0 + 5)])
        await store._promoting.task  # started by the insert; awaited only to observe its end
        assert due_rows_in_file(db, "due_far") == 0
        await store.insert([new_task(due_ms=T0 + 6)])
        assert store._promoting.task.done()  # no second promotion within promote_every_s
        assert len(await load(store)) == 2
    assert due_rows_in_file(db, "due_far") == 1


def test_far_due_rows_start_at_a_far_bucket_at_least_the_lead_ahead():
    now = sqlite_store.now_ms()
    far_from = sqlite_store._far_from_ms()
    assert far_from % FAR == 0
    assert now + sqlite_store.PROMOTE_LEAD_MS <= far_from < now + sqlite_store.PROMOTE_LEAD_MS + FAR + 1_000


async def test_reads_racing_a_promotion_see_every_task_once(db, monkeypatch):
    _far_from(monkeypatch, T0)
    monkeypatch.setattr(sqlite_store, "_PROMOTE_CHUNK", 100)
    tasks = [new_task(shard=i % 2, due_ms=T0 + i * 20) for i in range(6_000)]
    async with opened(lambda: SqliteStore(db, num_shards=2, promote_every_s=0)) as writer, \
            opened(lambda: SqliteStore(db, num_shards=2, promote_every_s=0)) as reader:
        await writer.insert(tasks)

        async def every_task_once() -> None:
            for shard in range(2):
                ids = [r.task_id for r in await reader.load_due(shard, T0, T0 + 2 * FAR)]
                assert len(ids) == len(set(ids)) == 3_000

        # Between chunks: buckets half moved, read from both tables.
        assert await writer._write(writer._promote_chunk, (T0 + FAR) // FAR) == 100
        await every_task_once()
        # During them: reads on another connection while the rest moves.
        promotion = asyncio.ensure_future(writer.promote(before_ms=T0 + 2 * FAR))
        while not promotion.done():
            await every_task_once()
        assert await promotion == 5_900
        await every_task_once()


_PROMOTING_CHILD = textwrap.dedent("""
    import asyncio, sys
    from taskwheel.stores.sqlite import store as sqlite
    from taskwheel.task import TaskRecord

    async def main(path):
        sqlite._far_from_ms = lambda: 0
        sqlite._PROMOTE_CHUNK = 50
        store = sqlite.SqliteStore(path, num_shards=4, promote_every_s=0)
        await store.open()
        await store.insert([
            TaskRecord(task_id=f"t{i:05d}", shard=i % 4, queue="q", payload=b"x" * 200,
                       fire_at_ms=i * 20, due_ms=i * 20)
            for i in range(20_000)
        ])
        print("inserted", flush=True)
        await store.promote(before_ms=1 << 40)
        print("promoted", flush=True)

    asyncio.run(main(sys.argv[1]))
""")


async def test_kill_9_mid_promotion_loses_and_doubles_no_due_row(db):
    os.makedirs(os.path.dirname(db))
    child = subprocess.Popen([sys.executable, "-c", _PROMOTING_CHILD, db],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "inserted\n", f"child exited early with {child.poll()}"
        deadline = time.monotonic() + 30
        while not due_rows_in_file(db) and time.monotonic() < deadline:
            time.sleep(0.001)  # until the first chunks are in; all 400 take far longer
    finally:
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait()
    assert "promoted" not in rest, "the promotion ended before the kill: nothing was tested"
    rows = _due_rows_by_table(db)
    assert rows["due"], "no chunk was promoted before the kill: nothing was tested"
    assert len(rows["due"]) + len(rows["due_far"]) == 20_000
    assert not set(rows["due"]) & set(rows["due_far"])
    async with opened(lambda: SqliteStore(db, num_shards=4, promote_every_s=0)) as store:
        loaded = [r.task_id for s in range(4) for r in await store.load_due(s, 0, 20_000 * 20)]
        assert sorted(loaded) == [f"t{i:05d}" for i in range(20_000)]
        await store.promote(before_ms=1 << 40)
        again = [r.task_id for s in range(4) for r in await store.load_due(s, 0, 20_000 * 20)]
        assert sorted(again) == sorted(loaded)
    assert due_rows_in_file(db, "due_far") == 0


# ---- purging -------------------------------------------------------------------------------

async def test_purge_deletes_superseded_and_ended_rows_and_keeps_live_ones(db):
    tasks = [new_task(due_ms=T0 + i) for i in range(6)]
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert(tasks)
        await store.apply([lease(t, T0 + 30_000) for t in tasks[:3]], now_ms=T0)  # 3 superseded
        await store.apply([succeed(tasks[0], gen=2)], now_ms=T0)  # and its new row ends
        await store.cancel(tasks[3].task_id, now_ms=T0)
        live = await load(store)
        assert await store.purge_before(T0 + 2 * BUCKET_MS) == 5
        assert await load(store) == live
    assert due_rows_in_file(db) == len(live) == 4


async def test_purge_leaves_the_bucket_holding_its_cutoff(db):
    early, late = new_task(due_ms=T0 + 10), new_task(due_ms=T0 + BUCKET_MS + 10)
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert([early, late])
        await store.apply([succeed(early), succeed(late)], now_ms=T0)
        assert await store.purge_before(T0 + BUCKET_MS + 59_999) == 1
        assert await store.purge_before(T0 + 2 * BUCKET_MS) == 1
    assert due_rows_in_file(db) == 0


async def save_checkpoints(store: SqliteStore, checkpoints: dict[int, int]) -> None:
    """Saves checkpoints as an owner does: by renewing the shards' leases (taken if needed)."""
    leases = await store.shard_leases()
    await store.acquire_shards("test", [leases[s] for s in checkpoints if leases[s].owner != "test"], T0)
    leases = await store.shard_leases()
    assert await store.renew_shards("test", {s: (leases[s].epoch, ms) for s, ms in checkpoints.items()}, T0) == set()


async def test_purge_stays_a_margin_behind_the_slowest_checkpoint(db):
    async with opened(lambda: SqliteStore(db, num_shards=4, purge_every_s=0)) as store:
        created = store.created_ms
        old = new_task(shard=0, due_ms=created - 10 * BUCKET_MS)
        recent = new_task(shard=1, due_ms=created - 1 * BUCKET_MS)
        await store.insert([old, recent])
        await store.apply([succeed(old), succeed(recent)], now_ms=created)
        await save_checkpoints(store, {s: created + 60 * BUCKET_MS for s in range(1, 4)})
        # shard 0's checkpoint is still the creation time: only buckets 5+ minutes before it go
        assert await store.purge(margin_ms=5 * BUCKET_MS) == 1
    assert due_rows_in_file(db) == 1


async def test_purge_works_through_more_rows_than_one_chunk(db):
    tasks = [new_task(shard=0, due_ms=T0 + i) for i in range(5_000)]
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert(tasks)
        await store.apply([lease(t, T0 + BUCKET_MS * 5) for t in tasks], now_ms=T0)
        assert await store.purge_before(T0 + BUCKET_MS) == 5_000
        assert len(await store.load_due(0, T0, T0 + BUCKET_MS * 6)) == 5_000


async def test_renewing_leases_purges_in_the_background(db):
    async with opened(lambda: SqliteStore(db, num_shards=4, purge_every_s=3600)) as store:
        created = store.created_ms
        old = new_task(due_ms=created - 20 * BUCKET_MS)
        await store.insert([old])
        await store.apply([succeed(old)], now_ms=created)
        await save_checkpoints(store, {s: created for s in range(4)})
        await store._purging.task  # started by the save; awaited here only to observe its end
        assert due_rows_in_file(db) == 0
        again = new_task(due_ms=created - 20 * BUCKET_MS)
        await store.insert([again])
        await store.apply([succeed(again)], now_ms=created)
        await save_checkpoints(store, {s: created + 1 for s in range(4)})
        assert store._purging.task.done()  # no second purge within purge_every_s
    assert due_rows_in_file(db) == 1


# ---- the write-ahead log -------------------------------------------------------------------

async def test_wal_stays_bounded_under_continuous_writes(db, monkeypatch):
    # Scaled down 32x: restart past 4 MiB, keep 1 MiB. Unchecked, 60 batches leave ~60 MiB.
    monkeypatch.setattr(sqlite_threads, "CHECKPOINT_EVERY_S", 0.01)
    monkeypatch.setattr(sqlite_threads, "WAL_RESTART_PAGES", 1_000)
    monkeypatch.setattr(sqlite_threads, "WAL_KEEP_BYTES", 1 << 20)
    largest = 0
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        for batch in range(60):
            await store.insert([new_task(shard=i % 4, due_ms=T0 + batch * 1_000 + i,
                                         payload=b"p" * 500) for i in range(1_000)])
            largest = max(largest, os.path.getsize(db + "-wal"))
    assert largest < 32 << 20


async def test_tasks_are_in_the_database_file_after_close(db):
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert([new_task(shard=i % 4) for i in range(100)])
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 100


async def test_loaded_records_are_kept_out_of_the_cyclic_gcs_view(db):
    # They wait in the timer's wheel for seconds; see taskwheel.core.records.
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await store.insert([new_task(due_ms=T0 + i) for i in range(3)])
        rows = await load(store)
    assert len(rows) == 3 and not any(gc.is_tracked(r) for r in rows)


async def test_due_rows_are_read_by_the_core_only_when_it_shares_pythons_sqlite(db, monkeypatch):
    task = new_task(due_ms=T0)
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        await insert_one(store, task)
        assert store._due_reader is not None
        [by_core] = await load(store)
    monkeypatch.setattr(sqlite_store, "same_sqlite_as_python", lambda: False)
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        assert store._due_reader is None
        [by_json] = await load(store)
    assert by_core == by_json == task


def _niceness_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
@pytest.mark.parametrize("nice", [0, 5, 19])
async def test_store_threads_run_below_the_event_loop_by_thread_nice(db, nice):
    loop_nice = _niceness_of_this_thread()
    async with opened(lambda: SqliteStore(db, num_shards=4, thread_nice=nice)) as store:
        writer = await store._write(_niceness_of_this_thread)
        reader = await store._read(_niceness_of_this_thread)
        stat = f"/proc/self/task/{store._checkpointer._thread.native_id}/stat"
        deadline = time.monotonic() + 5  # the checkpointer sets its own as it starts
        while True:
            with open(stat) as f:
                checkpointer = int(f.read().rsplit(")", 1)[1].split()[16])
            if checkpointer == min(19, loop_nice + nice) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    assert _niceness_of_this_thread() == loop_nice  # the loop's own thread keeps its priority
    assert writer == reader == checkpointer == min(19, loop_nice + nice)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc are Linux's")
async def test_store_threads_are_named_where_top_and_ps_show_them(db):
    def own_name():
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    loop_name = own_name()
    async with opened(lambda: SqliteStore(db, num_shards=4)) as store:
        names = {await store._write(own_name), await store._read(own_name)}
        comm = f"/proc/self/task/{store._checkpointer._thread.native_id}/comm"
        deadline = time.monotonic() + 5  # the checkpointer names itself as it starts
        while True:
            with open(comm) as f:
                checkpointer = f.read().strip()
            if checkpointer == "tw-sqlite-ckpt" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    assert names | {checkpointer} == {"tw-sqlite-write", "tw-sqlite-read", "tw-sqlite-ckpt"}
    assert own_name() == loop_name


def test_thread_nice_outside_0_to_19_is_refused(db):
    with pytest.raises(ValueError, match="thread_nice=-1: use 0"):
        SqliteStore(db, thread_nice=-1)
