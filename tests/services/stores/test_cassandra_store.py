"""CassandraStore against a real Apache Cassandra (marker ``cassandra``).

The server: TASKWHEEL_CASSANDRA=host:port when set, else one started for this test session with
the dev launcher (taskwheel dev cassandra) in a temporary directory on a free port, and stopped at
the end. Each test module gets a fresh keyspace; tests that need an empty store make their own.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
from cassandra.cluster import Cluster, Session

from taskwheel.core import BUCKET_MS, bucket_of
from taskwheel.stores import StoreUnavailable, Transition, TransitionKind, open_store
from taskwheel.stores.cassandra import CassandraStore, devserver
from taskwheel.stores.cassandra import store as store_module
from taskwheel.task import TaskRecord, TaskState
from tests.services.stores.contract import StoreContract

pytestmark = pytest.mark.cassandra
# The module's own tests share one event loop: their shared store lives on it.
module_loop = pytest.mark.asyncio(loop_scope="module")

SHARDS = 4


# ---- the server, a loop and a store per module ------------------------------------------------

@pytest.fixture(scope="session")
def cql(cassandra_contact) -> Iterator[Session]:
    """A plain driver session, for looking under the store and for dropping keyspaces."""
    host, port = cassandra_contact
    cluster = Cluster([host], port=port, protocol_version=5)
    session = cluster.connect()
    yield session
    cluster.shutdown()


@pytest.fixture(scope="module")
def cql_three(cassandra_cluster) -> Iterator[Session]:
    """A driver session on the three-node cluster."""
    cluster = Cluster(cassandra_cluster.hosts, port=cassandra_cluster.port, protocol_version=5)
    yield cluster.connect()
    cluster.shutdown()


def drop_keyspace(cql: Session, keyspace: str) -> None:
    # Every keyspace costs the server heap (seven tables' memtables and metadata): a session
    # of contract tests, one keyspace each, would exhaust a small dev heap without this.
    cql.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


def fresh_keyspace(prefix: str = "tw") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(cassandra_contact, cql) -> AsyncIterator[CassandraStore]:
    """One store for the module's tests, on the module's event loop (a store lives on one)."""
    host, port = cassandra_contact
    s = CassandraStore([host], port, fresh_keyspace(), num_shards=SHARDS)
    await s.open()
    yield s
    await s.close()
    drop_keyspace(cql, s.keyspace)


@pytest_asyncio.fixture(loop_scope="module")
async def new_store(cassandra_contact, cql) -> AsyncIterator[Callable[..., Awaitable[CassandraStore]]]:
    """Opens stores on fresh keyspaces (or a given one) and closes them after the test."""
    opened = []

    async def make(keyspace: str | None = None, **options: Any) -> CassandraStore:
        host, port = cassandra_contact
        options.setdefault("num_shards", SHARDS)
        s = CassandraStore([host], port, keyspace or fresh_keyspace(), **options)
        await s.open()
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()
    for keyspace in {s.keyspace for s in opened}:
        drop_keyspace(cql, keyspace)


class TestCassandraStoreContract(StoreContract):
    """The store contract (tests/services/stores/contract.py), each test on a fresh keyspace."""

    @pytest.fixture
    def make_store(self, cassandra_contact, cql) -> Iterator[Callable[[], CassandraStore]]:
        host, port = cassandra_contact
        keyspace = fresh_keyspace("contract")
        yield lambda: CassandraStore([host], port, keyspace, num_shards=8)
        drop_keyspace(cql, keyspace)


class TestCassandraStoreContractOnThreeNodes(StoreContract):
    """The same contract on three nodes with replication factor 3: every read and write at
    LOCAL_QUORUM, every lease and claim a Paxos round, through real replicas."""

    @pytest.fixture
    def make_store(self, cassandra_three, cql_three) -> Iterator[Callable[[], CassandraStore]]:
        keyspace = fresh_keyspace("contract3")
        yield lambda: CassandraStore(cassandra_three.hosts, cassandra_three.port, keyspace,
                                     num_shards=8, replication_factor=3)
        drop_keyspace(cql_three, keyspace)


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


async def live(store: CassandraStore, shard: int, start: int, minutes: int = 10) -> list:
    rows = await store.load_due(shard, start, start + minutes * BUCKET_MS)
    return [(r.task_id, r.gen) for r in rows]


# ---- opening -----------------------------------------------------------------------------------

@module_loop
async def test_open_creates_keyspace_and_tables_and_is_idempotent(new_store):
    s = await new_store()
    await s.open()
    assert (await s.get("nothing")) is None
    assert (await s.load_checkpoint(0)) == s.created_ms


@module_loop
async def test_reopening_with_another_shard_count_is_refused(new_store):
    s = await new_store(num_shards=8)
    with pytest.raises(ValueError, match="created with 8 shards"):
        await new_store(s.keyspace, num_shards=16)


@module_loop
async def test_reopening_keeps_the_creation_time(new_store):
    first = await new_store()
    again = await new_store(first.keyspace)
    assert again.created_ms == first.created_ms


@module_loop
async def test_open_against_a_closed_port_raises_store_unavailable():
    s = CassandraStore(["127.0.0.1"], devserver.free_ports().cql, fresh_keyspace(),
                       connect_timeout_s=2)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await s.open()
    assert time.monotonic() - began < 30


@module_loop
async def test_store_url_builds_a_cassandra_store_with_typed_options():
    s = open_store("cassandra://127.0.0.1:9142/ks1?shards=8&write_cl=ONE&retention_s=3600")
    assert isinstance(s, CassandraStore)
    assert (s.hosts, s.port, s.keyspace, s.num_shards) == (["127.0.0.1"], 9142, "ks1", 8)
    assert s.options.write_cl == "ONE" and s.options.retention_s == 3600


@module_loop
async def test_unknown_option_or_consistency_level_is_refused():
    with pytest.raises(ValueError, match="unknown Cassandra store option"):
        CassandraStore(["127.0.0.1"], 9042, "ks", wirte_cl="ONE")
    with pytest.raises(ValueError, match="unknown consistency level"):
        CassandraStore(["127.0.0.1"], 9042, "ks", read_cl="MOST")


# ---- insert and get ----------------------------------------------------------------------------

@module_loop
async def test_claim_left_by_a_failed_insert_is_taken_over_after_the_grace(store, cql):
    # An insert that claimed its key and then failed leaves a claim naming a task that was
    # never stored; a retry must not be told "duplicate of a task that does not exist".
    t = task(own_slice(), key="orphaned")
    cql.execute(
        f"INSERT INTO {store.keyspace}.idempotency (queue, idempotency_key, task_id, claimed_ms) "
        "VALUES (%s, %s, %s, %s)",
        (t.queue, t.idempotency_key, "never-stored", now_ms() - store.options.claim_grace_ms - 1),
    )
    (outcome,) = await store.insert([t])
    assert (outcome.task_id, outcome.duplicate) == (t.task_id, False)
    assert (await store.get(t.task_id)) is not None


@module_loop
async def test_young_claim_without_its_task_is_waited_for_then_taken_over(new_store, cql):
    s = await new_store(claim_grace_ms=600)
    t = task(own_slice(), key="in-flight")
    cql.execute(
        f"INSERT INTO {s.keyspace}.idempotency (queue, idempotency_key, task_id, claimed_ms) "
        "VALUES (%s, %s, %s, %s)",
        (t.queue, t.idempotency_key, "in-flight-elsewhere", now_ms()),
    )
    began = time.monotonic()
    (outcome,) = await s.insert([t])
    assert outcome.duplicate is False
    assert time.monotonic() - began >= 0.5


@module_loop
async def test_retried_insert_of_a_keyed_task_is_reported_duplicate_of_itself(store):
    t = task(own_slice(), key="retried")
    await store.insert([t])
    (outcome,) = await store.insert([t])
    assert (outcome.task_id, outcome.duplicate) == (t.task_id, True)


@module_loop
async def test_retried_insert_does_not_roll_back_a_task_that_moved_on(store):
    # Writes to a task row are versioned by gen (USING TIMESTAMP): an insert replayed after
    # the task was leased loses to the lease, and its gen-1 due row stays dead.
    start = own_slice()
    t = task(start)
    await store.insert([t])
    assert (await store.apply([lease(t, start + BUCKET_MS)], now_ms())) == [True]
    await store.insert([t])
    got = await store.get(t.task_id)
    assert (got.gen, got.state) == (2, TaskState.LEASED)
    assert await live(store, 0, start) == [(t.task_id, 2)]


@module_loop
async def test_batches_of_large_payloads_stay_under_the_batch_size_limit(store):
    # Cassandra rejects multi-partition batches over 50 KiB: the by-id rows must be split.
    start = own_slice()
    tasks = [task(start + i, shard=i % SHARDS, payload=bytes(1000 + i % 7)) for i in range(300)]
    tasks.append(task(start + 500, payload=bytes(64 * 1024)))
    assert [o.duplicate for o in (await store.insert(tasks))] == [False] * len(tasks)
    loaded = sum([len(await store.load_due(s, start, start + BUCKET_MS)) for s in range(SHARDS)])
    assert loaded == len(tasks)


@module_loop
async def test_rows_expire_retention_after_their_due_time(new_store, cql):
    s = await new_store(retention_s=3600)
    due = now_ms() + 120_000
    t = task(due)
    await s.insert([t])
    (due_ttl,) = cql.execute(
        f"SELECT TTL(payload) FROM {s.keyspace}.due WHERE shard = 0 AND bucket = %s",
        (bucket_of(due),)).one()
    (task_ttl,) = cql.execute(
        f"SELECT TTL(payload) FROM {s.keyspace}.tasks WHERE task_id = %s", (t.task_id,)).one()
    for ttl in (due_ttl, task_ttl):
        assert 3600 + 110 <= ttl <= 3600 + 121


@module_loop
async def test_null_cells_of_fields_that_may_be_empty_read_as_empty(store, cql):
    # A cell is null when its column came after the row was written, or when it expired before
    # the rest of the row: the payload, the headers and the text fields that default to "".
    task_id = uuid.uuid4().hex
    cql.execute(
        f"INSERT INTO {store.keyspace}.tasks (task_id, shard, queue, fire_at_ms, due_ms, state, attempt, "
        "max_attempts, gen, lease_ms, created_ms, updated_ms) VALUES (%s, 1, 'q', 2, 3, 2, 4, 5, 6, 7, 8, 9)",
        (task_id,))
    assert (await store.get(task_id)) == TaskRecord(
        task_id=task_id, shard=1, queue="q", payload=b"", fire_at_ms=2, due_ms=3, state=TaskState.LEASED,
        attempt=4, max_attempts=5, gen=6, headers={}, idempotency_key="", lease_ms=7, traceparent="",
        created_ms=8, updated_ms=9, last_error="")


# ---- load_due ----------------------------------------------------------------------------------

@module_loop
async def test_load_due_rejects_a_shard_outside_the_store(store):
    with pytest.raises(ValueError):
        await store.load_due(SHARDS, 0, 1)


@module_loop
async def test_load_due_pages_through_a_partition_larger_than_one_page(store):
    start = own_slice()
    tasks = [task(start + i % 50_000, shard=3) for i in range(6_000)]  # driver page: 5000 rows
    for i in range(0, len(tasks), 1000):
        await store.insert(tasks[i:i + 1000])
    got = await store.load_due(3, start, start + BUCKET_MS)
    assert len(got) == 6_000
    assert [(r.due_ms, r.task_id) for r in got] == sorted((t.due_ms, t.task_id) for t in tasks)


# ---- transitions -------------------------------------------------------------------------------

def stale_reads(store: CassandraStore, snapshot: dict) -> None:
    """Makes the store's next gen-check read see ``snapshot``: the interleaving in which
    another writer changed the task between this writer's read and its write."""
    real = store._read_current

    async def read(task_ids, cl):
        store._read_current = real
        return {k: list(v) for k, v in snapshot.items() if k in task_ids}

    store._read_current = read


@module_loop
async def test_ack_racing_a_lease_of_the_same_gen_wins_and_the_lease_row_stays_dead(store):
    start = own_slice()
    t = task(start)
    await store.insert([t])
    before = await store._read_current({t.task_id}, store._cl["get"])
    ack = Transition(t.task_id, 0, TransitionKind.SUCCEED, 1, start)
    assert (await store.apply([ack], now_ms())) == [True]
    stale_reads(store, before)
    assert (await store.apply([lease(t, start + BUCKET_MS)], now_ms())) == [True]  # the race window
    assert (await store.get(t.task_id)).state == TaskState.SUCCEEDED  # ack outranks lease
    assert await live(store, 0, start) == []  # the lease's gen-2 row is not live


@module_loop
async def test_cancel_racing_a_lease_of_the_same_gen_wins(store):
    start = own_slice()
    t = task(start)
    await store.insert([t])
    before = await store._read_current({t.task_id}, store._cl["get"])
    await store.cancel(t.task_id, now_ms())
    stale_reads(store, before)
    await store.apply([lease(t, start + BUCKET_MS)], now_ms())
    assert (await store.get(t.task_id)).state == TaskState.CANCELLED
    assert await live(store, 0, start) == []


@module_loop
async def test_lease_racing_an_earlier_gens_write_keeps_the_later_gen(store):
    # A transition from gen 2 lands; then one that read gen 1 writes. Versions put gen 2 first.
    start = own_slice()
    t = task(start)
    await store.insert([t])
    before = await store._read_current({t.task_id}, store._cl["get"])
    await store.apply([lease(t, start + BUCKET_MS)], now_ms())
    leased = await store.get(t.task_id)
    await store.apply([lease(leased, start + 2 * BUCKET_MS)], now_ms())
    stale_reads(store, before)
    await store.apply([Transition(t.task_id, 0, TransitionKind.FAIL, 1, start, error="late")], now_ms())
    got = await store.get(t.task_id)
    assert (got.gen, got.state, got.last_error) == (3, TaskState.LEASED, "")
    assert await live(store, 0, start) == [(t.task_id, 3)]


def failing_from(store: CassandraStore, statement: str) -> None:
    """The next writes that carry ``statement`` fail as if Cassandra went away."""
    real = store._execute
    query_id = store._binders[statement].prepared.query_id

    async def execute(request, cl=None):
        parts = getattr(request, "_statements_and_parameters", ())
        if any(part[1] == query_id for part in parts):
            raise StoreUnavailable("injected outage")
        return await real(request, cl)

    store._execute = execute


def test_too_few_replicas_names_the_level_and_certainly_wrote_nothing():
    from cassandra import ConsistencyLevel, Unavailable

    refused = store_module._unavailable("cassandra://h:1/ks", Unavailable(
        "x", consistency=ConsistencyLevel.LOCAL_QUORUM, required_replicas=2, alive_replicas=1))
    assert str(refused) == ("cassandra://h:1/ks: too few Cassandra replicas up: LOCAL_QUORUM "
                            "needs 2 and the coordinator sees 1")
    assert not refused.maybe_applied and refused.retry_after_ms == store_module.UNAVAILABLE_RETRY_MS


def test_a_timeout_or_a_lost_coordinator_may_have_written():
    from cassandra import ConsistencyLevel, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable
    from cassandra.connection import ConnectionException
    from cassandra.policies import WriteType

    slow = store_module._unavailable("ks", WriteTimeout(
        "x", write_type=WriteType.UNLOGGED_BATCH, consistency=ConsistencyLevel.LOCAL_QUORUM,
        required_responses=2, received_responses=1))
    assert "LOCAL_QUORUM needs 2 answers and 1 came" in str(slow) and slow.maybe_applied
    unavailable = Unavailable("x", consistency=ConsistencyLevel.LOCAL_QUORUM, required_replicas=2,
                              alive_replicas=1)
    every_one_refused = NoHostAvailable("all", {"a": unavailable, "b": unavailable})
    assert not store_module._unavailable("ks", every_one_refused).maybe_applied
    first_one_lost = NoHostAvailable("all", {"a": ConnectionException("reset"), "b": unavailable})
    assert store_module._unavailable("ks", first_one_lost).maybe_applied


@pytest.mark.parametrize("outage_at", ["insert_due", "update_task", "insert_done"])
@module_loop
async def test_outage_part_way_through_a_lease_never_leaves_the_task_without_a_live_row(
        new_store, outage_at):
    s = await new_store()
    start = own_slice()
    t = task(start)
    await s.insert([t])
    failing_from(s, outage_at)
    with pytest.raises(StoreUnavailable):
        await s.apply([lease(t, start + BUCKET_MS)], now_ms())
    gen = (await s.get(t.task_id)).gen
    assert (t.task_id, gen) in await live(s, 0, start)


@pytest.mark.parametrize("outage_at", ["insert_due", "insert_task"])
@module_loop
async def test_outage_part_way_through_an_insert_leaves_no_task_that_cannot_fire(
        new_store, outage_at):
    s = await new_store()
    start = own_slice()
    t = task(start, key="k-outage")
    failing_from(s, outage_at)
    with pytest.raises(StoreUnavailable) as refused:
        await s.insert([t])
    # Refused in its first phase, the insert wrote nothing; in the second, its due rows.
    assert refused.value.maybe_applied == (outage_at == "insert_task")
    if (await s.get(t.task_id)) is not None:
        assert await live(s, 0, start) == [(t.task_id, 1)]
    # The client's retry (a new id, the same key) is stored once the failed claim is stale,
    # instead of being told "duplicate of" a task that cannot fire.
    del s._execute
    s.options.claim_grace_ms = 0
    retried = task(start, key="k-outage")
    assert (await s.insert([retried]))[0].duplicate is False
    assert (retried.task_id, 1) in await live(s, 0, start)


@module_loop
async def test_lease_without_the_task_is_a_programming_error(store):
    with pytest.raises(ValueError, match="carries no task"):
        await store.apply([Transition("x", 0, TransitionKind.LEASE, 1, 0, due_ms=1, attempt=2)], 0)


# ---- the event loop ----------------------------------------------------------------------------

@module_loop
async def test_requests_do_not_block_the_event_loop(store):
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
        await asyncio.gather(
            *(store.load_due(s, start, start + BUCKET_MS) for s in range(SHARDS)))
        done.set()
        await ticking

    await body()
    assert ticks > 20  # the loop kept turning while the driver worked
