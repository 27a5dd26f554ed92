"""CassandraStore against a real Apache Cassandra (marker ``cassandra``).

The server: TASKWHEEL_CASSANDRA=host:port when set, else one started for this test session with
the dev launcher (taskwheel dev cassandra) in a temporary directory on a free port, and stopped at
the end. Each test module gets a fresh keyspace; tests that need an empty store make their own.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

from taskwheel.stores import (
    AlreadyEnded,
    StoreUnavailable,
    TaskRecord,
    TaskState,
    Transition,
    TransitionKind,
    open_store,
)
from taskwheel.stores.base import BUCKET_MS, bucket_of
from taskwheel.stores.cassandra import CassandraStore, devserver

pytestmark = pytest.mark.cassandra

T = TypeVar("T")
SHARDS = 4


# ---- the server, a loop and a store per module ------------------------------------------------

@pytest.fixture(scope="session")
def cassandra_contact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a Cassandra that answers CQL."""
    given = os.environ.get("TASKWHEEL_CASSANDRA")
    if given:
        host, _, port = given.rpartition(":")
        yield host or "127.0.0.1", int(port)
        return
    directory = tmp_path_factory.mktemp("cassandra")
    ports = devserver.start(directory, fast=True, heap="1G")
    try:
        yield devserver.HOST, ports.cql
    finally:
        devserver.stop(directory)


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Awaitable[T]], T]]:
    """Runs a coroutine on this module's event loop (the store lives on one loop)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def fresh_keyspace(prefix: str = "tw") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def store(cassandra_contact, run) -> Iterator[CassandraStore]:
    host, port = cassandra_contact
    s = CassandraStore([host], port, fresh_keyspace(), num_shards=SHARDS)
    run(s.open())
    yield s
    run(s.close())


@pytest.fixture
def new_store(cassandra_contact, run) -> Iterator[Callable[..., CassandraStore]]:
    """Opens stores on fresh keyspaces (or a given one) and closes them after the test."""
    opened = []

    def make(keyspace: str | None = None, **options: Any) -> CassandraStore:
        host, port = cassandra_contact
        options.setdefault("num_shards", SHARDS)
        s = CassandraStore([host], port, keyspace or fresh_keyspace(), **options)
        run(s.open())
        opened.append(s)
        return s

    yield make
    for s in opened:
        run(s.close())


# ---- helpers -----------------------------------------------------------------------------------

def now_ms() -> int:
    return time.time_ns() // 1_000_000


def minute_ahead(n: int) -> int:
    """The start of a minute bucket n minutes from now: tests use their own time slices."""
    return (now_ms() // BUCKET_MS + n) * BUCKET_MS


_minutes = iter(range(10, 10_000, 10))


def own_slice() -> int:
    """A fresh 10-minute slice of time for one test, so loads see only that test's rows."""
    return minute_ahead(next(_minutes))


def task(due_ms: int, shard: int = 0, key: str = "", queue: str = "q", **fields: Any) -> TaskRecord:
    now = now_ms()
    return TaskRecord(
        task_id=uuid.uuid4().hex, shard=shard, queue=queue, payload=fields.pop("payload", b"p"),
        fire_at_ms=due_ms, due_ms=due_ms, idempotency_key=key, created_ms=now, updated_ms=now,
        **fields,
    )


def lease(r: TaskRecord, due_ms: int) -> Transition:
    return Transition(r.task_id, r.shard, TransitionKind.LEASE, r.gen, r.due_ms, due_ms=due_ms,
                      attempt=r.attempt + 1, task=r)


def live(run, store: CassandraStore, shard: int, start: int, minutes: int = 10) -> list:
    return [(r.task_id, r.gen) for r in run(store.load_due(shard, start, start + minutes * BUCKET_MS))]


# ---- opening -----------------------------------------------------------------------------------

def test_open_creates_keyspace_and_tables_and_is_idempotent(new_store, run):
    s = new_store()
    run(s.open())
    assert run(s.get("nothing")) is None
    assert run(s.load_checkpoint(0)) == s.created_ms


def test_reopening_with_another_shard_count_is_refused(new_store):
    s = new_store(num_shards=8)
    with pytest.raises(ValueError, match="created with 8 shards"):
        new_store(s.keyspace, num_shards=16)


def test_reopening_keeps_the_creation_time(new_store):
    first = new_store()
    again = new_store(first.keyspace)
    assert again.created_ms == first.created_ms


def test_open_against_a_closed_port_raises_store_unavailable(run):
    s = CassandraStore(["127.0.0.1"], devserver.free_ports().cql, fresh_keyspace(),
                       connect_timeout_s=2)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        run(s.open())
    assert time.monotonic() - began < 30


def test_store_url_builds_a_cassandra_store_with_typed_options():
    s = open_store("cassandra://127.0.0.1:9142/ks1?shards=8&write_cl=ONE&retention_s=3600")
    assert isinstance(s, CassandraStore)
    assert (s.hosts, s.port, s.keyspace, s.num_shards) == (["127.0.0.1"], 9142, "ks1", 8)
    assert s.options.write_cl == "ONE" and s.options.retention_s == 3600


def test_unknown_option_or_consistency_level_is_refused():
    with pytest.raises(ValueError, match="unknown Cassandra store option"):
        CassandraStore(["127.0.0.1"], 9042, "ks", wirte_cl="ONE")
    with pytest.raises(ValueError, match="unknown consistency level"):
        CassandraStore(["127.0.0.1"], 9042, "ks", read_cl="MOST")


# ---- insert and get ----------------------------------------------------------------------------

def test_inserted_task_reads_back_scheduled_at_gen_1_with_every_field(store, run):
    t = task(own_slice(), shard=1, payload=b"\x00\xffbytes", headers={"a": "1", "b": "2"},
             traceparent="00-abc-def-01", max_attempts=5, lease_ms=1234)
    assert run(store.insert([t]))[0].duplicate is False
    got = run(store.get(t.task_id))
    assert got == t  # SCHEDULED, gen 1, attempt 1: the defaults of a new task


def test_get_of_an_unknown_task_is_none(store, run):
    assert run(store.get(uuid.uuid4().hex)) is None


def test_second_task_with_a_taken_key_returns_the_first_and_stores_nothing(store, run):
    start = own_slice()
    first, second = task(start, key="k"), task(start + 1, key="k")
    run(store.insert([first]))
    (outcome,) = run(store.insert([second]))
    assert (outcome.task_id, outcome.duplicate) == (first.task_id, True)
    assert run(store.get(second.task_id)) is None
    assert live(run, store, 0, start) == [(first.task_id, 1)]


def test_same_key_in_another_queue_is_not_a_duplicate(store, run):
    start = own_slice()
    a, b = task(start, key="k2", queue="qa"), task(start, key="k2", queue="qb")
    outcomes = run(store.insert([a, b]))
    assert [o.duplicate for o in outcomes] == [False, False]


def test_two_tasks_with_one_key_in_one_call_the_first_wins(store, run):
    start = own_slice()
    a, b, c = task(start, key="k3"), task(start + 1), task(start + 2, key="k3")
    outcomes = run(store.insert([a, b, c]))
    assert [(o.task_id, o.duplicate) for o in outcomes] == [
        (a.task_id, False), (b.task_id, False), (a.task_id, True)]
    assert run(store.get(c.task_id)) is None


def test_claim_left_by_a_failed_insert_is_taken_over_after_the_grace(store, run):
    # An insert that claimed its key and then failed leaves a claim naming a task that was
    # never stored; a retry must not be told "duplicate of a task that does not exist".
    t = task(own_slice(), key="orphaned")
    store._session.execute(
        "INSERT INTO idempotency (queue, idempotency_key, task_id, claimed_ms) VALUES (%s, %s, %s, %s)",
        (t.queue, t.idempotency_key, "never-stored", now_ms() - store.options.claim_grace_ms - 1),
    )
    (outcome,) = run(store.insert([t]))
    assert (outcome.task_id, outcome.duplicate) == (t.task_id, False)
    assert run(store.get(t.task_id)) is not None


def test_young_claim_without_its_task_is_waited_for_then_taken_over(new_store, run):
    s = new_store(claim_grace_ms=600)
    t = task(own_slice(), key="in-flight")
    s._session.execute(
        "INSERT INTO idempotency (queue, idempotency_key, task_id, claimed_ms) VALUES (%s, %s, %s, %s)",
        (t.queue, t.idempotency_key, "in-flight-elsewhere", now_ms()),
    )
    began = time.monotonic()
    (outcome,) = run(s.insert([t]))
    assert outcome.duplicate is False
    assert time.monotonic() - began >= 0.5


def test_retried_insert_of_a_keyed_task_is_reported_duplicate_of_itself(store, run):
    t = task(own_slice(), key="retried")
    run(store.insert([t]))
    (outcome,) = run(store.insert([t]))
    assert (outcome.task_id, outcome.duplicate) == (t.task_id, True)


def test_retried_insert_does_not_roll_back_a_task_that_moved_on(store, run):
    # Writes to a task row are versioned by gen (USING TIMESTAMP): an insert replayed after
    # the task was leased loses to the lease, and its gen-1 due row stays dead.
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    assert run(store.apply([lease(t, start + BUCKET_MS)], now_ms())) == [True]
    run(store.insert([t]))
    got = run(store.get(t.task_id))
    assert (got.gen, got.state) == (2, TaskState.LEASED)
    assert live(run, store, 0, start) == [(t.task_id, 2)]


def test_batches_of_large_payloads_stay_under_the_batch_size_limit(store, run):
    # Cassandra rejects multi-partition batches over 50 KiB: the by-id rows must be split.
    start = own_slice()
    tasks = [task(start + i, shard=i % SHARDS, payload=bytes(1000 + i % 7)) for i in range(300)]
    tasks.append(task(start + 500, payload=bytes(64 * 1024)))
    assert [o.duplicate for o in run(store.insert(tasks))] == [False] * len(tasks)
    loaded = sum(len(run(store.load_due(s, start, start + BUCKET_MS))) for s in range(SHARDS))
    assert loaded == len(tasks)


def test_rows_expire_retention_after_their_due_time(new_store, run):
    s = new_store(retention_s=3600)
    due = now_ms() + 120_000
    t = task(due)
    run(s.insert([t]))
    (due_ttl,) = s._session.execute(
        "SELECT TTL(payload) FROM due WHERE shard = 0 AND bucket = %s", (bucket_of(due),)).one()
    (task_ttl,) = s._session.execute(
        "SELECT TTL(payload) FROM tasks WHERE task_id = %s", (t.task_id,)).one()
    for ttl in (due_ttl, task_ttl):
        assert 3600 + 110 <= ttl <= 3600 + 121


# ---- load_due ----------------------------------------------------------------------------------

def test_load_due_returns_the_range_in_due_then_id_order_across_buckets(store, run):
    start = own_slice()
    dues = [start + 59_999, start + 5, start + 60_000, start + 3 * BUCKET_MS + 1, start + 5,
            start - 1, start + 4 * BUCKET_MS]
    tasks = [task(d, shard=2) for d in dues]
    run(store.insert(tasks))
    got = run(store.load_due(2, start, start + 4 * BUCKET_MS))
    expected = sorted((t.due_ms, t.task_id) for t in tasks if start <= t.due_ms < start + 4 * BUCKET_MS)
    assert [(r.due_ms, r.task_id) for r in got] == expected


def test_load_due_sees_only_its_shard(store, run):
    start = own_slice()
    a, b = task(start, shard=0), task(start, shard=1)
    run(store.insert([a, b]))
    assert live(run, store, 1, start) == [(b.task_id, 1)]


def test_load_due_of_an_empty_or_inverted_range_is_empty(store, run):
    start = own_slice()
    run(store.insert([task(start)]))
    assert run(store.load_due(0, start, start)) == []
    assert run(store.load_due(0, start + 5, start)) == []


def test_load_due_rejects_a_shard_outside_the_store(store, run):
    with pytest.raises(ValueError):
        run(store.load_due(SHARDS, 0, 1))


def test_load_due_pages_through_a_partition_larger_than_one_page(store, run):
    start = own_slice()
    tasks = [task(start + i % 50_000, shard=3) for i in range(6_000)]  # driver page: 5000 rows
    for i in range(0, len(tasks), 1000):
        run(store.insert(tasks[i:i + 1000]))
    got = run(store.load_due(3, start, start + BUCKET_MS))
    assert len(got) == 6_000
    assert [(r.due_ms, r.task_id) for r in got] == sorted((t.due_ms, t.task_id) for t in tasks)


# ---- transitions -------------------------------------------------------------------------------

def test_lease_supersedes_the_due_row_with_a_leased_row_at_the_lease_expiry(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    assert run(store.apply([lease(t, start + 2 * BUCKET_MS)], now_ms())) == [True]
    (row,) = run(store.load_due(0, start, start + 10 * BUCKET_MS))
    assert (row.task_id, row.gen, row.state, row.attempt, row.due_ms) == (
        t.task_id, 2, TaskState.LEASED, 2, start + 2 * BUCKET_MS)
    assert row.payload == t.payload
    got = run(store.get(t.task_id))
    assert (got.gen, got.state, got.attempt, got.due_ms) == (2, TaskState.LEASED, 2, start + 2 * BUCKET_MS)


def test_ack_ends_the_task_succeeded_and_leaves_no_live_row(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    run(store.apply([lease(t, start + BUCKET_MS)], now_ms()))
    ack = Transition(t.task_id, 0, TransitionKind.SUCCEED, 2, start + BUCKET_MS)
    assert run(store.apply([ack], now_ms())) == [True]
    assert run(store.get(t.task_id)).state == TaskState.SUCCEEDED
    assert live(run, store, 0, start) == []


def test_retry_schedules_a_new_gen_with_the_error(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    run(store.apply([lease(t, start + BUCKET_MS)], now_ms()))
    leased = run(store.get(t.task_id))
    retry = Transition(t.task_id, 0, TransitionKind.RETRY, 2, start + BUCKET_MS,
                       due_ms=start + 3 * BUCKET_MS, attempt=2, error="boom", task=leased)
    assert run(store.apply([retry], now_ms())) == [True]
    (row,) = run(store.load_due(0, start, start + 10 * BUCKET_MS))
    assert (row.gen, row.state, row.due_ms, row.last_error) == (
        3, TaskState.SCHEDULED, start + 3 * BUCKET_MS, "boom")
    assert run(store.get(t.task_id)).last_error == "boom"


def test_fail_ends_the_task_failed_with_the_error(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    fail = Transition(t.task_id, 0, TransitionKind.FAIL, 1, start, error="fatal")
    assert run(store.apply([fail], now_ms())) == [True]
    got = run(store.get(t.task_id))
    assert (got.state, got.last_error) == (TaskState.FAILED, "fatal")
    assert live(run, store, 0, start) == []


def test_transition_from_a_stale_gen_is_ignored_and_writes_no_row(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    run(store.apply([lease(t, start + BUCKET_MS)], now_ms()))
    stale = lease(t, start + 5 * BUCKET_MS)  # still expects gen 1
    assert run(store.apply([stale], now_ms())) == [False]
    assert live(run, store, 0, start) == [(t.task_id, 2)]


def test_transition_of_an_ended_or_unknown_task_is_ignored(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    run(store.apply([Transition(t.task_id, 0, TransitionKind.SUCCEED, 1, start)], now_ms()))
    again = Transition(t.task_id, 0, TransitionKind.FAIL, 1, start, error="late")
    unknown = Transition(uuid.uuid4().hex, 0, TransitionKind.SUCCEED, 1, start)
    assert run(store.apply([again, unknown], now_ms())) == [False, False]
    assert run(store.get(t.task_id)).state == TaskState.SUCCEEDED


def test_transitions_of_one_call_apply_in_order(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    first = lease(t, start + BUCKET_MS)
    ack = Transition(t.task_id, 0, TransitionKind.SUCCEED, 2, start + BUCKET_MS)
    duplicate_lease = lease(t, start + 2 * BUCKET_MS)
    assert run(store.apply([first, ack, duplicate_lease], now_ms())) == [True, True, False]
    got = run(store.get(t.task_id))
    assert (got.gen, got.state) == (2, TaskState.SUCCEEDED)
    assert live(run, store, 0, start) == []


def test_lease_without_the_task_is_a_programming_error(store, run):
    with pytest.raises(ValueError, match="carries no task"):
        run(store.apply([Transition("x", 0, TransitionKind.LEASE, 1, 0, due_ms=1, attempt=2)], 0))


# ---- cancel ------------------------------------------------------------------------------------

def test_cancel_ends_a_scheduled_task_and_kills_its_row(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    now = now_ms()
    got = run(store.cancel(t.task_id, now))
    assert (got.task_id, got.state, got.updated_ms) == (t.task_id, TaskState.CANCELLED, now)
    assert run(store.get(t.task_id)).state == TaskState.CANCELLED
    assert live(run, store, 0, start) == []


def test_cancel_of_a_leased_task_kills_its_redelivery_row(store, run):
    start = own_slice()
    t = task(start)
    run(store.insert([t]))
    run(store.apply([lease(t, start + BUCKET_MS)], now_ms()))
    assert run(store.cancel(t.task_id, now_ms())).state == TaskState.CANCELLED
    assert live(run, store, 0, start) == []
    ack = Transition(t.task_id, 0, TransitionKind.SUCCEED, 2, start + BUCKET_MS)
    assert run(store.apply([ack], now_ms())) == [False]


def test_cancel_of_an_unknown_task_is_none(store, run):
    assert run(store.cancel(uuid.uuid4().hex, now_ms())) is None


def test_cancel_of_an_ended_task_raises_already_ended(store, run):
    t = task(own_slice())
    run(store.insert([t]))
    run(store.apply([Transition(t.task_id, 0, TransitionKind.SUCCEED, 1, t.due_ms)], now_ms()))
    with pytest.raises(AlreadyEnded) as ended:
        run(store.cancel(t.task_id, now_ms()))
    assert ended.value.record.state == TaskState.SUCCEEDED


# ---- checkpoints and counts --------------------------------------------------------------------

def test_checkpoint_defaults_to_the_creation_time(new_store, run):
    s = new_store()
    assert [run(s.load_checkpoint(shard)) for shard in range(SHARDS)] == [s.created_ms] * SHARDS


def test_checkpoint_never_moves_backwards(new_store, run):
    s = new_store()
    base = s.created_ms
    run(s.save_checkpoints({0: base + 5000, 1: base + 10}))
    run(s.save_checkpoints({0: base + 4000, 1: base + 20}))
    assert (run(s.load_checkpoint(0)), run(s.load_checkpoint(1))) == (base + 5000, base + 20)
    assert run(s.load_checkpoint(2)) == base


def test_checkpoint_below_the_creation_time_reads_as_the_creation_time(new_store, run):
    s = new_store()
    run(s.save_checkpoints({0: s.created_ms - 60_000}))
    assert run(s.load_checkpoint(0)) == s.created_ms


def test_counts_follow_inserts_and_transitions(new_store, run):
    s = new_store()
    start = own_slice()
    a, b, c, d = (task(start + i) for i in range(4))
    run(s.insert([a, b, c, d]))
    run(s.apply([lease(a, start + BUCKET_MS),
                 Transition(b.task_id, 0, TransitionKind.SUCCEED, 1, b.due_ms),
                 Transition(c.task_id, 0, TransitionKind.FAIL, 1, c.due_ms, error="x")], now_ms()))
    run(s.cancel(d.task_id, now_ms()))
    assert run(s.counts()) == {
        TaskState.SCHEDULED: 0, TaskState.LEASED: 1, TaskState.SUCCEEDED: 1,
        TaskState.FAILED: 1, TaskState.CANCELLED: 1,
    }


# ---- the event loop ----------------------------------------------------------------------------

def test_requests_do_not_block_the_event_loop(store, run):
    start = own_slice()
    tasks = [task(start + i, shard=i % SHARDS) for i in range(2000)]
    ticks = 0

    async def ticker(done: asyncio.Event) -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def body() -> None:
        done = asyncio.Event()
        ticking = asyncio.ensure_future(ticker(done))
        await store.insert(tasks)
        await asyncio.gather(*(store.load_due(s, start, start + BUCKET_MS) for s in range(SHARDS)))
        done.set()
        await ticking

    run(body())
    assert ticks > 20  # the loop kept turning while the driver worked
