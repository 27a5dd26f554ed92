"""The store contract: what every taskwheel Store does, written once for all of them.

How a store plugs in
--------------------
Subclass ``StoreContract`` in a test module under tests/services/stores/ and give it a ``make_store``
fixture::

    from tests.services.stores.contract import StoreContract

    class TestMyStoreContract(StoreContract):
        @pytest.fixture
        def make_store(self, tmp_path):
            # A zero-argument callable. Every call returns a NEW, unopened store over this
            # test's storage: the same location each time (so a second instance sees what the
            # first wrote), empty before the first open, with num_shards >= 4.
            return lambda: MyStore(location_for(tmp_path), num_shards=8)

That is all: pytest collects the inherited ``test_*`` methods. The tests are ``async def``,
run by pytest-asyncio. Each test opens its stores itself, ``async with opened(make_store) as
store:``, so a store never outlives the event loop it was opened on; a second ``async with``
is a restart on the same data.

If the storage is created before the test (a schema shared by several tests, say), set
``store_created_in_test = False``: the test of the default checkpoint then skips its lower
bound. Class attribute ``model_examples`` sets how many random operation sequences the model
test tries (each one opens a store once).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskwheel.core import BUCKET_MS
from taskwheel.stores.base import AlreadyEnded, InsertOutcome, Member, Store, Transition, TransitionKind
from taskwheel.task import TERMINAL_STATES, TaskRecord, TaskState

MakeStore = Callable[[], Store]

T0 = 28_333_333 * BUCKET_MS  # 2023-11-14, on a bucket boundary
_RUN = uuid.uuid4().hex[:8]  # task ids stay unique if a store's storage outlives one test run
_serial = itertools.count()


@asynccontextmanager
async def opened(make_store: MakeStore) -> AsyncIterator[Store]:
    store = make_store()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_task(shard: int = 0, due_ms: int = T0, **fields) -> TaskRecord:
    """A task as ingest would hand it to the store, with a unique id unless one is given."""
    fields.setdefault("task_id", f"{_RUN}-{next(_serial):06d}")
    fields.setdefault("queue", "emails")
    fields.setdefault("payload", b"payload of " + fields["task_id"].encode())
    fields.setdefault("fire_at_ms", due_ms)
    fields.setdefault("created_ms", T0 - 5_000)
    fields.setdefault("updated_ms", T0 - 5_000)
    return TaskRecord(shard=shard, due_ms=due_ms, **fields)


def lease(rec: TaskRecord, due_ms: int, *, gen: int | None = None, attempt: int | None = None):
    return Transition(
        rec.task_id, rec.shard, TransitionKind.LEASE,
        expected_gen=rec.gen if gen is None else gen, old_due_ms=rec.due_ms,
        due_ms=due_ms, attempt=rec.attempt + 1 if attempt is None else attempt, task=rec,
    )


def retry(rec: TaskRecord, due_ms: int, error: str, *, gen: int | None = None):
    return Transition(
        rec.task_id, rec.shard, TransitionKind.RETRY,
        expected_gen=rec.gen if gen is None else gen, old_due_ms=rec.due_ms,
        due_ms=due_ms, attempt=rec.attempt + 1, error=error, task=rec,
    )


def succeed(rec: TaskRecord, *, gen: int | None = None):
    return Transition(
        rec.task_id, rec.shard, TransitionKind.SUCCEED,
        expected_gen=rec.gen if gen is None else gen, old_due_ms=rec.due_ms,
    )


def fail(rec: TaskRecord, error: str, *, gen: int | None = None):
    return Transition(
        rec.task_id, rec.shard, TransitionKind.FAIL,
        expected_gen=rec.gen if gen is None else gen, old_due_ms=rec.due_ms, error=error,
    )


DELIVERY_FIELDS = (
    "task_id", "shard", "queue", "payload", "fire_at_ms", "due_ms", "state", "attempt",
    "max_attempts", "gen", "headers", "lease_ms", "traceparent",
)


def delivery(rec: TaskRecord) -> dict:
    """What load_due promises about a row: the due row's delivery fields and the task's state."""
    return {name: getattr(rec, name) for name in DELIVERY_FIELDS}


def keys(records: list[TaskRecord]) -> list[tuple[int, str]]:
    return [(r.due_ms, r.task_id) for r in records]


def in_due_order(records: list[TaskRecord]) -> list[TaskRecord]:
    """load_due's rows come in no particular order; tests compare them sorted."""
    return sorted(records, key=lambda r: (r.due_ms, r.task_id))


async def load(store: Store, shard: int = 0, from_ms: int = T0 - 10 * BUCKET_MS,
               to_ms: int = T0 + 10 * BUCKET_MS) -> list[TaskRecord]:
    """load_due of a wide range, in due order."""
    return in_due_order(await store.load_due(shard, from_ms, to_ms))


async def insert_one(store: Store, task: TaskRecord) -> TaskRecord:
    [outcome] = await store.insert([task])
    assert outcome == InsertOutcome(task.task_id, duplicate=False)
    return task


class StoreContract:
    store_created_in_test = True
    model_examples = 25

    @pytest.fixture
    def make_store(self) -> MakeStore:
        raise NotImplementedError("a store's test class provides make_store (see contract.py)")

    # ---- insert and get ----------------------------------------------------------------------

    async def test_insert_then_get_returns_the_task_as_given(self, make_store):
        task = new_task(
            shard=3, due_ms=T0 + 1_234, fire_at_ms=T0 + 1_000, attempt=1, max_attempts=7,
            headers={"content-type": "text/plain", "x-tenant": "acme"}, idempotency_key="",
            lease_ms=12_000, traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        async with opened(make_store) as store:
            await insert_one(store, task)
            assert await store.get(task.task_id) == task

    async def test_insert_stores_new_tasks_as_scheduled_at_gen_1(self, make_store):
        task = new_task(state=TaskState.LEASED, gen=9)
        async with opened(make_store) as store:
            await insert_one(store, task)
            stored = await store.get(task.task_id)
        assert (stored.state, stored.gen) == (TaskState.SCHEDULED, 1)

    async def test_insert_answers_one_outcome_per_task_in_order(self, make_store):
        tasks = [new_task(shard=i % 4, due_ms=T0 + i) for i in range(50)]
        async with opened(make_store) as store:
            outcomes = await store.insert(tasks)
        assert outcomes == [InsertOutcome(t.task_id) for t in tasks]

    async def test_get_of_an_unknown_task_is_none(self, make_store):
        async with opened(make_store) as store:
            assert await store.get("no-such-task") is None

    async def test_inserted_task_is_due_in_its_shard(self, make_store):
        task = new_task(shard=2, due_ms=T0 + 500)
        async with opened(make_store) as store:
            await insert_one(store, task)
            [row] = await load(store, shard=2)
        assert delivery(row) == delivery(task)

    # ---- idempotency keys --------------------------------------------------------------------

    async def test_duplicate_key_within_one_batch_keeps_the_first_task(self, make_store):
        first = new_task(idempotency_key="order-1", due_ms=T0 + 1)
        second = new_task(idempotency_key="order-1", due_ms=T0 + 2)
        other = new_task(idempotency_key="order-2", due_ms=T0 + 3)
        async with opened(make_store) as store:
            outcomes = await store.insert([first, second, other])
            assert outcomes == [
                InsertOutcome(first.task_id),
                InsertOutcome(first.task_id, duplicate=True),
                InsertOutcome(other.task_id),
            ]
            assert await store.get(second.task_id) is None
            assert keys(await load(store)) == keys([first, other])

    async def test_duplicate_key_in_a_later_batch_names_the_first_task(self, make_store):
        first = new_task(idempotency_key="order-1", due_ms=T0 + 1)
        later = new_task(idempotency_key="order-1", due_ms=T0 + 2, payload=b"different")
        async with opened(make_store) as store:
            await insert_one(store, first)
            assert await store.insert([later]) == [InsertOutcome(first.task_id, duplicate=True)]
            assert await store.get(later.task_id) is None
            assert await store.get(first.task_id) == first
            assert keys(await load(store)) == keys([first])
            assert (await store.counts()).get(TaskState.SCHEDULED, 0) == 1

    async def test_duplicate_key_is_recognised_after_a_restart(self, make_store):
        first = new_task(idempotency_key="order-1")
        async with opened(make_store) as store:
            await insert_one(store, first)
        async with opened(make_store) as store:
            [outcome] = await store.insert([new_task(idempotency_key="order-1")])
        assert outcome == InsertOutcome(first.task_id, duplicate=True)

    async def test_duplicate_key_still_names_a_task_that_has_ended(self, make_store):
        first = new_task(idempotency_key="order-1")
        async with opened(make_store) as store:
            await insert_one(store, first)
            await store.cancel(first.task_id, T0)
            [outcome] = await store.insert([new_task(idempotency_key="order-1")])
        assert outcome == InsertOutcome(first.task_id, duplicate=True)

    async def test_same_key_in_another_queue_is_a_new_task(self, make_store):
        a = new_task(queue="emails", idempotency_key="k")
        b = new_task(queue="invoices", idempotency_key="k")
        async with opened(make_store) as store:
            outcomes = await store.insert([a, b])
        assert outcomes == [InsertOutcome(a.task_id), InsertOutcome(b.task_id)]

    async def test_tasks_without_a_key_are_never_duplicates(self, make_store):
        tasks = [new_task(idempotency_key="") for _ in range(3)]
        async with opened(make_store) as store:
            outcomes = await store.insert(tasks)
        assert [o.duplicate for o in outcomes] == [False, False, False]

    # ---- load_due ----------------------------------------------------------------------------

    async def test_load_due_includes_from_and_excludes_to(self, make_store):
        tasks = [new_task(due_ms=T0 + d) for d in (999, 1_000, 1_001, 1_999, 2_000)]
        async with opened(make_store) as store:
            await store.insert(tasks)
            rows = await store.load_due(0, T0 + 1_000, T0 + 2_000)
        assert sorted(r.due_ms for r in rows) == [T0 + 1_000, T0 + 1_001, T0 + 1_999]

    async def test_load_due_of_an_empty_range_is_empty(self, make_store):
        async with opened(make_store) as store:
            await insert_one(store, new_task(due_ms=T0))
            assert await store.load_due(0, T0, T0) == []

    async def test_load_due_returns_each_live_row_of_the_range_once(self, make_store):
        tasks = [
            new_task(task_id=f"{_RUN}-order-c", due_ms=T0 + 5),
            new_task(task_id=f"{_RUN}-order-b", due_ms=T0 + 7),
            new_task(task_id=f"{_RUN}-order-a", due_ms=T0 + 5),
            new_task(task_id=f"{_RUN}-order-d", due_ms=T0 + 1),
        ]
        async with opened(make_store) as store:
            await store.insert(tasks)
            rows = await store.load_due(0, T0 - 10 * BUCKET_MS, T0 + 10 * BUCKET_MS)
        assert sorted(keys(rows)) == sorted(keys(tasks))

    async def test_load_due_spans_several_buckets(self, make_store):
        dues = [T0 + 3 * BUCKET_MS + 1, T0 - 1, T0, T0 + BUCKET_MS - 1, T0 + BUCKET_MS,
                T0 + 2 * BUCKET_MS + 30_000]
        tasks = [new_task(due_ms=d) for d in dues]
        async with opened(make_store) as store:
            await store.insert(tasks)
            rows = await store.load_due(0, T0 - BUCKET_MS, T0 + 3 * BUCKET_MS + 2)
            middle = await store.load_due(0, T0 + BUCKET_MS - 1, T0 + 2 * BUCKET_MS + 30_001)
        assert sorted(r.due_ms for r in rows) == sorted(dues)
        assert sorted(r.due_ms for r in middle) == [
            T0 + BUCKET_MS - 1, T0 + BUCKET_MS, T0 + 2 * BUCKET_MS + 30_000
        ]

    async def test_load_due_handles_zero_and_negative_times(self, make_store):
        dues = [-BUCKET_MS - 1, -BUCKET_MS, -BUCKET_MS + 1, -1, 0, 1, BUCKET_MS - 1, BUCKET_MS]
        tasks = [new_task(due_ms=d) for d in dues]
        async with opened(make_store) as store:
            await store.insert(tasks)
            everything = await store.load_due(0, -2 * BUCKET_MS, 2 * BUCKET_MS)
            around_zero = await store.load_due(0, -1, 1)
            negative_bucket = await store.load_due(0, -BUCKET_MS, 0)
        assert sorted(r.due_ms for r in everything) == dues
        assert sorted(r.due_ms for r in around_zero) == [-1, 0]
        assert sorted(r.due_ms for r in negative_bucket) == [-BUCKET_MS, -BUCKET_MS + 1, -1]

    async def test_load_due_returns_only_the_requested_shard(self, make_store):
        tasks = [new_task(shard=s, due_ms=T0 + s) for s in (0, 1, 2, 3, 1)]
        async with opened(make_store) as store:
            await store.insert(tasks)
            rows = await load(store, shard=1)
        assert keys(rows) == keys([tasks[1], tasks[4]])

    # ---- transitions -------------------------------------------------------------------------

    async def test_lease_moves_the_task_to_a_new_live_row_at_the_lease_expiry(self, make_store):
        task = new_task(due_ms=T0 + 100, max_attempts=5)
        async with opened(make_store) as store:
            await insert_one(store, task)
            assert await store.apply([lease(task, T0 + 30_100)], now_ms=T0 + 101) == [True]
            old_slice = await store.load_due(0, T0, T0 + 1_000)
            [row] = await store.load_due(0, T0 + 30_000, T0 + 31_000)
            stored = await store.get(task.task_id)
        assert old_slice == []
        assert (row.gen, row.due_ms, row.attempt) == (2, T0 + 30_100, 2)
        assert row.state == TaskState.LEASED
        assert (row.payload, row.queue, row.headers, row.max_attempts) == (
            task.payload, task.queue, task.headers, 5
        )
        assert (stored.state, stored.gen, stored.attempt, stored.due_ms, stored.updated_ms) == (
            TaskState.LEASED, 2, 2, T0 + 30_100, T0 + 101
        )

    async def test_lease_of_a_leased_task_redelivers_with_the_next_attempt(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.apply([lease(task, T0 + 30_000)], now_ms=T0)
            [row] = await load(store)
            assert await store.apply([lease(row, T0 + 60_000)], now_ms=T0 + 30_000) == [True]
            [again] = await load(store)
        assert (again.gen, again.attempt, again.due_ms) == (3, 3, T0 + 60_000)

    async def test_retry_reschedules_with_the_error_and_next_attempt(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.apply([lease(task, T0 + 30_000)], now_ms=T0)
            [leased] = await load(store)
            applied = await store.apply([retry(leased, T0 + 2_000, "boom")], now_ms=T0 + 10)
            [row] = await load(store)
            stored = await store.get(task.task_id)
        assert applied == [True]
        assert (row.gen, row.due_ms, row.attempt) == (3, T0 + 2_000, 3)
        assert row.state == TaskState.SCHEDULED
        assert (stored.state, stored.last_error, stored.gen) == (TaskState.SCHEDULED, "boom", 3)

    async def test_succeed_ends_the_task_and_its_due_rows(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.apply([lease(task, T0 + 30_000)], now_ms=T0)
            applied = await store.apply([succeed(task, gen=2)], now_ms=T0 + 50)
            stored = await store.get(task.task_id)
            assert await load(store) == []
        assert applied == [True]
        assert (stored.state, stored.updated_ms) == (TaskState.SUCCEEDED, T0 + 50)

    async def test_fail_ends_the_task_with_its_error(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.apply([lease(task, T0 + 30_000)], now_ms=T0)
            assert await store.apply([fail(task, "bad input", gen=2)], now_ms=T0 + 9) == [True]
            stored = await store.get(task.task_id)
            assert await load(store) == []
        assert (stored.state, stored.last_error) == (TaskState.FAILED, "bad input")

    async def test_transition_from_a_stale_gen_is_ignored(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.apply([lease(task, T0 + 30_000)], now_ms=T0)
            stale = [lease(task, T0 + 40_000), retry(task, T0 + 1, "x"), succeed(task),
                     fail(task, "x")]
            assert await store.apply(stale, now_ms=T0 + 1) == [False, False, False, False]
            [row] = await load(store)
            stored = await store.get(task.task_id)
        assert (row.gen, row.due_ms) == (2, T0 + 30_000)
        assert (stored.state, stored.gen, stored.last_error) == (TaskState.LEASED, 2, "")

    async def test_transitions_in_one_call_apply_in_order(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            applied = await store.apply(
                [lease(task, T0 + 30_000), lease(task, T0 + 50_000), succeed(task, gen=2)],
                now_ms=T0,
            )
            stored = await store.get(task.task_id)
        assert applied == [True, False, True]
        assert stored.state == TaskState.SUCCEEDED

    async def test_transition_of_an_unknown_task_is_not_applied(self, make_store):
        ghost = new_task()
        async with opened(make_store) as store:
            applied = await store.apply([lease(ghost, T0), succeed(ghost)], now_ms=T0)
            assert applied == [False, False]
            assert await store.get(ghost.task_id) is None

    async def test_one_batch_mixes_applied_and_ignored_transitions(self, make_store):
        a, b, c = (new_task(due_ms=T0 + i) for i in range(3))
        async with opened(make_store) as store:
            await store.insert([a, b, c])
            applied = await store.apply(
                [lease(a, T0 + 30_000), lease(b, T0 + 30_000, gen=7), succeed(c)], now_ms=T0
            )
            rows = await load(store)
        assert applied == [True, False, True]
        assert [(r.task_id, r.gen) for r in rows] == [(b.task_id, 1), (a.task_id, 2)]

    async def test_terminal_task_is_never_live_again(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.cancel(task.task_id, now_ms=T0)
            after_cancel = [lease(task, T0 + 30_000), retry(task, T0 + 5, "x"), succeed(task)]
            assert await store.apply(after_cancel, now_ms=T0 + 1) == [False, False, False]
            assert await store.load_due(0, T0 - BUCKET_MS, T0 + 2 * BUCKET_MS) == []
            assert (await store.get(task.task_id)).state == TaskState.CANCELLED

    # ---- cancel ------------------------------------------------------------------------------

    async def test_cancel_of_an_unknown_task_is_none(self, make_store):
        async with opened(make_store) as store:
            assert await store.cancel("no-such-task", now_ms=T0) is None

    async def test_cancel_returns_the_cancelled_task_and_removes_it_from_due(self, make_store):
        task = new_task(shard=1, due_ms=T0 + 10)
        async with opened(make_store) as store:
            await insert_one(store, task)
            cancelled = await store.cancel(task.task_id, now_ms=T0 + 3)
            assert await load(store, shard=1) == []
            assert await store.get(task.task_id) == cancelled
        assert cancelled == dataclasses.replace(
            task, state=TaskState.CANCELLED, updated_ms=T0 + 3
        )

    async def test_cancel_of_a_leased_task_ends_its_redelivery(self, make_store):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            await store.apply([lease(task, T0 + 30_000)], now_ms=T0)
            cancelled = await store.cancel(task.task_id, now_ms=T0 + 1)
            assert await load(store) == []
        assert (cancelled.state, cancelled.gen) == (TaskState.CANCELLED, 2)

    @pytest.mark.parametrize("end", ["cancel", "succeed", "fail"])
    async def test_cancel_of_an_ended_task_raises_already_ended(self, make_store, end):
        task = new_task(due_ms=T0)
        async with opened(make_store) as store:
            await insert_one(store, task)
            if end == "cancel":
                await store.cancel(task.task_id, now_ms=T0)
            else:
                await store.apply([succeed(task) if end == "succeed" else fail(task, "e")], T0)
            with pytest.raises(AlreadyEnded) as raised:
                await store.cancel(task.task_id, now_ms=T0 + 1)
        assert raised.value.record.task_id == task.task_id
        assert raised.value.record.state in TERMINAL_STATES
        assert raised.value.record.state.name.lower().startswith(end[:4])

    # ---- checkpoints -------------------------------------------------------------------------

    async def test_checkpoint_defaults_to_the_creation_time(self, make_store):
        before = now_ms()
        async with opened(make_store) as store:
            defaults = {await store.load_checkpoint(s) for s in range(store.num_shards)}
        after = now_ms()
        [created] = defaults
        assert created <= after
        if self.store_created_in_test:
            assert created >= before

    async def test_checkpoint_default_survives_a_restart(self, make_store):
        async with opened(make_store) as store:
            first = await store.load_checkpoint(0)
        async with opened(make_store) as store:
            assert await store.load_checkpoint(0) == first

    # ---- shard leases --------------------------------------------------------------------------

    async def test_every_shard_starts_unowned_at_epoch_0_from_the_creation_time(self, make_store):
        async with opened(make_store) as store:
            leases = await store.shard_leases()
            created = await store.load_checkpoint(0)
        assert [lease.shard for lease in leases] == list(range(store.num_shards))
        assert {(lease.owner, lease.epoch, lease.checkpoint_ms) for lease in leases} == {("", 0, created)}
        assert all(lease.lapsed(now_ms()) for lease in leases)

    async def test_acquire_takes_shards_as_seen_at_the_next_epoch(self, make_store):
        async with opened(make_store) as store:
            seen = await store.shard_leases()
            taken = await store.acquire_shards("node-a", seen[:2], expires_ms=T0 + 5_000)
            assert [(t.shard, t.owner, t.epoch, t.expires_ms) for t in taken] == [
                (0, "node-a", 1, T0 + 5_000), (1, "node-a", 1, T0 + 5_000)]
            now = await store.shard_leases()
        assert now[:2] == taken
        assert now[2].owner == ""

    async def test_acquire_refuses_a_lease_changed_since_it_was_read(self, make_store):
        # Two nodes read the same free shards; the second to write finds them taken.
        async with opened(make_store) as store:
            seen = await store.shard_leases()
            first = await store.acquire_shards("node-a", seen[:3], expires_ms=T0)
            second = await store.acquire_shards("node-b", seen[1:4], expires_ms=T0)
            leases = await store.shard_leases()
        assert [t.shard for t in first] == [0, 1, 2]
        assert [(t.shard, t.owner, t.epoch) for t in second] == [(3, "node-b", 1)]
        assert [lease.owner for lease in leases[:4]] == ["node-a", "node-a", "node-a", "node-b"]

    async def test_every_acquisition_raises_the_epoch(self, make_store):
        async with opened(make_store) as store:
            epochs = []
            for node in ("a", "b", "a", "c", "c"):
                [lease] = await store.acquire_shards(node, [(await store.shard_leases())[1]], expires_ms=T0)
                epochs.append(lease.epoch)
                if node == "b":
                    assert await store.release_shards("b", {1: (lease.epoch, lease.checkpoint_ms)}) == {1}
            assert epochs == [1, 2, 3, 4, 5]
        async with opened(make_store) as store:
            assert (await store.shard_leases())[1].epoch == 5

    async def test_renew_extends_the_lease_and_saves_the_checkpoint(self, make_store):
        async with opened(make_store) as store:
            base = await store.load_checkpoint(0)
            taken = await store.acquire_shards("node-a", (await store.shard_leases())[:2], expires_ms=T0)
            lost = await store.renew_shards("node-a", {0: (1, base + 60_000), 1: (1, base + 75_000)},
                                            expires_ms=T0 + 1_000)
            assert lost == set() and len(taken) == 2
        async with opened(make_store) as store:
            leases = await store.shard_leases()
            assert [(lease.owner, lease.epoch, lease.expires_ms, lease.checkpoint_ms) for lease in leases[:3]] == [
                ("node-a", 1, T0 + 1_000, base + 60_000), ("node-a", 1, T0 + 1_000, base + 75_000),
                ("", 0, 0, base)]
            assert await store.load_checkpoint(1) == base + 75_000

    async def test_renew_by_a_node_that_lost_the_shard_writes_nothing(self, make_store):
        # node-a's lease lapsed (a long pause) and node-b took the shard: node-a's renewal,
        # checkpoint included, is refused for that shard and applied for the one it still holds.
        async with opened(make_store) as store:
            base = await store.load_checkpoint(0)
            await store.acquire_shards("node-a", (await store.shard_leases())[:2], expires_ms=T0)
            await store.acquire_shards("node-b", [(await store.shard_leases())[0]], expires_ms=T0 + 9_000)
            lost = await store.renew_shards("node-a", {0: (1, base + 50_000), 1: (1, base + 40_000)},
                                            expires_ms=T0 + 5_000)
            leases = await store.shard_leases()
        assert lost == {0}
        assert (leases[0].owner, leases[0].epoch, leases[0].expires_ms, leases[0].checkpoint_ms) == (
            "node-b", 2, T0 + 9_000, base)
        assert (leases[1].owner, leases[1].expires_ms, leases[1].checkpoint_ms) == ("node-a", T0 + 5_000, base + 40_000)

    async def test_renew_at_an_old_epoch_of_the_same_node_is_refused(self, make_store):
        # A node restarted under the same id took its shard again: its earlier incarnation,
        # still running somewhere, must not renew it.
        async with opened(make_store) as store:
            await store.acquire_shards("node-a", [(await store.shard_leases())[2]], expires_ms=T0)
            await store.acquire_shards("node-a", [(await store.shard_leases())[2]], expires_ms=T0)
            assert await store.renew_shards("node-a", {2: (1, T0)}, expires_ms=T0 + 1) == {2}
            assert await store.renew_shards("node-a", {2: (2, T0)}, expires_ms=T0 + 1) == set()

    async def test_release_saves_the_checkpoint_and_frees_the_shard(self, make_store):
        async with opened(make_store) as store:
            base = await store.load_checkpoint(0)
            await store.acquire_shards("node-a", (await store.shard_leases())[:2], expires_ms=T0 + 60_000)
            released = await store.release_shards("node-a", {0: (1, base + 30_000), 1: (7, base + 30_000)})
            leases = await store.shard_leases()
        assert released == {0}  # shard 1 is not held at epoch 7: left alone
        assert (leases[0].owner, leases[0].epoch, leases[0].expires_ms, leases[0].checkpoint_ms) == (
            "", 1, 0, base + 30_000)
        assert leases[0].lapsed(T0) and not leases[1].lapsed(T0)

    async def test_a_lease_lapses_at_its_expiry(self, make_store):
        async with opened(make_store) as store:
            [lease] = await store.acquire_shards("node-a", [(await store.shard_leases())[0]], expires_ms=T0)
        assert not lease.lapsed(T0 - 1) and lease.lapsed(T0)

    async def test_lease_calls_refuse_a_shard_out_of_range(self, make_store):
        async with opened(make_store) as store:
            with pytest.raises(ValueError, match="shard"):
                await store.renew_shards("node-a", {store.num_shards: (1, T0)}, expires_ms=T0)

    # ---- members -----------------------------------------------------------------------------

    async def test_members_lists_live_members_by_node_id(self, make_store):
        async with opened(make_store) as store:
            await store.heartbeat(Member("node-b", "127.0.0.1:7071", frozenset({"timer", "dispatch"}),
                                         frozenset({"emails", "é-mails"}), T0, T0 + 5_000))
            await store.heartbeat(Member("node-a", "127.0.0.1:7070", frozenset({"ingest"}), frozenset(),
                                         T0, T0 + 3_000))
            live = await store.members(T0)
            assert [m.node_id for m in live] == ["node-a", "node-b"]
            assert live[1] == Member("node-b", "127.0.0.1:7071", frozenset({"timer", "dispatch"}),
                                     frozenset({"emails", "é-mails"}), T0, T0 + 5_000)
            assert [m.node_id for m in await store.members(T0 + 3_000)] == ["node-b"]
            assert await store.members(T0 + 5_000) == []

    async def test_a_heartbeat_replaces_the_members_row_and_leave_removes_it(self, make_store):
        async with opened(make_store) as store:
            await store.heartbeat(Member("node-a", "h:1", frozenset({"timer"}), frozenset({"q1"}), T0, T0 + 1_000))
            await store.heartbeat(Member("node-a", "h:1", frozenset({"timer"}), frozenset({"q2"}), T0, T0 + 2_000))
            [member] = await store.members(T0 + 1_500)
            assert member.queues == frozenset({"q2"}) and member.expires_ms == T0 + 2_000
            await store.leave("node-a")
            assert await store.members(T0) == []

    # ---- counts ------------------------------------------------------------------------------

    async def test_counts_tasks_by_state(self, make_store):
        tasks = [new_task(due_ms=T0 + i) for i in range(7)]
        async with opened(make_store) as store:
            await store.insert(tasks)
            await store.apply(
                [lease(tasks[0], T0 + 30_000), lease(tasks[1], T0 + 30_000),
                 lease(tasks[2], T0 + 30_000), retry(tasks[3], T0 + 1_000, "e"),
                 succeed(tasks[2], gen=2), fail(tasks[4], "e")],
                now_ms=T0,
            )
            await store.cancel(tasks[5].task_id, now_ms=T0)
            counts = await store.counts()
        assert {state: counts.get(state, 0) for state in TaskState} == {
            TaskState.SCHEDULED: 2,  # tasks[3] (retried), tasks[6]
            TaskState.LEASED: 2,
            TaskState.SUCCEEDED: 1,
            TaskState.FAILED: 1,
            TaskState.CANCELLED: 1,
        }

    async def test_duplicates_are_not_counted(self, make_store):
        async with opened(make_store) as store:
            await store.insert([new_task(idempotency_key="k"), new_task(idempotency_key="k")])
            assert (await store.counts()).get(TaskState.SCHEDULED, 0) == 1

    # ---- durability and round trips ----------------------------------------------------------

    async def test_restart_keeps_tasks_states_and_due_rows(self, make_store):
        kept = [new_task(shard=s % 4, due_ms=T0 + s) for s in range(20)]
        async with opened(make_store) as store:
            await store.insert(kept)
            await store.apply([lease(kept[0], T0 + 30_000)], now_ms=T0)
            await store.cancel(kept[1].task_id, now_ms=T0)
            before = {s: await load(store, shard=s) for s in range(4)}
            counts = await store.counts()
        async with opened(make_store) as store:
            after = {s: await load(store, shard=s) for s in range(4)}
            assert await store.counts() == counts
            assert (await store.get(kept[0].task_id)).state == TaskState.LEASED
            assert (await store.get(kept[1].task_id)).state == TaskState.CANCELLED
            assert await store.get(kept[2].task_id) == kept[2]
        assert after == before
        assert sum(len(rows) for rows in after.values()) == 19

    async def test_large_payload_and_headers_round_trip(self, make_store):
        payload = bytes(range(256)) * 256  # 64 KiB, every byte value
        headers = {f"h{i}": "v" * 100 + str(i) for i in range(50)}
        headers.update({"": "empty name", "quote\"": "line\nbreak\ttab", "nul": "a\x00b"})
        task = new_task(payload=payload, headers=headers)
        async with opened(make_store) as store:
            await insert_one(store, task)
            stored = await store.get(task.task_id)
            [row] = await load(store)
            await store.apply([lease(row, T0 + 30_000)], now_ms=T0)
            [leased] = await load(store)
        assert (stored.payload, stored.headers) == (payload, headers)
        assert (row.payload, row.headers) == (payload, headers)
        assert (leased.payload, leased.headers) == (payload, headers)

    async def test_empty_payload_round_trips(self, make_store):
        task = new_task(payload=b"")
        async with opened(make_store) as store:
            await insert_one(store, task)
            assert (await store.get(task.task_id)).payload == b""

    async def test_unicode_queue_names_keys_and_headers_round_trip(self, make_store):
        queue = "письма.日本語.📬"
        task = new_task(queue=queue, idempotency_key="ключ-🔑", headers={"ü": "ß", "键": "值"})
        async with opened(make_store) as store:
            await insert_one(store, task)
            [row] = await load(store)
            [dup] = await store.insert([new_task(queue=queue, idempotency_key="ключ-🔑")])
            stored = await store.get(task.task_id)
        assert row.queue == queue
        assert stored == task
        assert dup == InsertOutcome(task.task_id, duplicate=True)

    async def test_open_and_close_are_idempotent(self, make_store):
        store = make_store()
        await store.open()
        await store.open()
        try:
            await insert_one(store, new_task())
        finally:
            await store.close()
            await store.close()

    # ---- the whole state machine against a model ---------------------------------------------

    def test_random_operation_sequences_match_a_model(self, make_store):
        """Inserts (with and without colliding keys), leases, retries, acks, fails, cancels and
        stale transitions in random order: get, load_due and counts agree with a plain model."""
        examples = itertools.count()
        loop = asyncio.new_event_loop()
        store = make_store()
        loop.run_until_complete(store.open())
        try:
            @settings(max_examples=self.model_examples, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])
            @given(st.lists(_operations, min_size=1, max_size=30))
            def check(operations):
                loop.run_until_complete(
                    _run_against_model(store, f"model{next(examples)}", operations)
                )

            check()
        finally:
            loop.run_until_complete(store.close())
            loop.close()


_operations = st.one_of(
    st.tuples(
        st.just("insert"),
        st.lists(st.tuples(st.integers(0, 3), st.integers(-3 * BUCKET_MS, 3 * BUCKET_MS),
                           st.sampled_from(["", "", "k1", "k2"])), min_size=1, max_size=5),
    ),
    st.tuples(st.sampled_from(["lease", "retry", "succeed", "fail", "cancel", "stale_lease"]),
              st.integers(0, 50), st.integers(-3 * BUCKET_MS, 3 * BUCKET_MS)),
    # Several transitions in one apply call, on the same task or others, as dispatch batches them.
    st.tuples(
        st.just("batch"),
        st.lists(
            st.tuples(
                st.sampled_from(["lease", "retry", "succeed", "succeed", "fail", "stale_lease"]),
                st.integers(0, 50), st.integers(-3 * BUCKET_MS, 3 * BUCKET_MS),
            ),
            min_size=2, max_size=12,
        ),
    ),
)


async def _run_against_model(store: Store, name: str, operations) -> None:
    queue = f"{_RUN}-{name}"  # keys are per queue, so earlier examples never collide
    before = await store.counts()
    model: dict[str, TaskRecord] = {}  # the task as it should be stored now
    order: list[str] = []
    key_holder: dict[str, str] = {}
    for op in operations:
        if op[0] == "insert":
            tasks = [new_task(shard=s, due_ms=due, queue=queue, idempotency_key=key)
                     for s, due, key in op[1]]
            outcomes = await store.insert(tasks)
            for task, outcome in zip(tasks, outcomes):
                holder = key_holder.get(task.idempotency_key) if task.idempotency_key else None
                assert outcome == InsertOutcome(holder or task.task_id, duplicate=bool(holder))
                if holder is None:
                    model[task.task_id] = task
                    order.append(task.task_id)
                    if task.idempotency_key:
                        key_holder[task.idempotency_key] = task.task_id
            continue
        if not order:
            continue
        if op[0] == "batch":
            # Each transition is built from the model as the ones before it in the call left it.
            transitions, expected = [], []
            for kind, index, due in op[1]:
                transition, applies = _next_transition(model[order[index % len(order)]], kind, due)
                transitions.append(transition)
                expected.append(applies)
            assert await store.apply(transitions, now_ms=T0 + 7) == expected
            continue
        kind, index, due = op
        task = model[order[index % len(order)]]
        if kind == "cancel":
            if task.state in TERMINAL_STATES:
                with pytest.raises(AlreadyEnded):
                    await store.cancel(task.task_id, now_ms=T0)
            else:
                await store.cancel(task.task_id, now_ms=T0)
                task.state, task.updated_ms = TaskState.CANCELLED, T0
            continue
        transition, applies = _next_transition(task, kind, due)
        assert await store.apply([transition], now_ms=T0 + 7) == [applies]

    for task_id in order:
        assert await store.get(task_id) == model[task_id]
    for shard in range(4):
        rows = [r for r in in_due_order(await store.load_due(shard, -4 * BUCKET_MS, 4 * BUCKET_MS))
                if r.queue == queue]
        live = [t for t in model.values()
                if t.shard == shard and t.state not in TERMINAL_STATES]
        assert [delivery(r) for r in rows] == [
            delivery(t) for t in sorted(live, key=lambda t: (t.due_ms, t.task_id))
        ]
    after = await store.counts()
    for state in TaskState:
        expected = sum(1 for t in model.values() if t.state == state)
        assert after.get(state, 0) - before.get(state, 0) == expected, state


def _next_transition(task: TaskRecord, kind: str, due: int) -> tuple[Transition, bool]:
    """The transition ``kind`` of the task as the model holds it, whether the store must apply
    it, and the model advanced as applying it (at T0 + 7) would."""
    before = dataclasses.replace(task)  # what the transition carries, unchanged by what follows
    transition = {
        "lease": lambda: lease(before, due),
        "stale_lease": lambda: lease(before, due, gen=before.gen - 1),
        "retry": lambda: retry(before, due, f"error at {due}"),
        "succeed": lambda: succeed(before),
        "fail": lambda: fail(before, f"failed at {due}"),
    }[kind]()
    applies = task.state not in TERMINAL_STATES and kind != "stale_lease"
    if applies:
        task.updated_ms = T0 + 7
        if kind in ("lease", "retry"):
            task.gen, task.due_ms, task.attempt = task.gen + 1, due, transition.attempt
            task.state = TaskState.LEASED if kind == "lease" else TaskState.SCHEDULED
            if kind == "retry":
                task.last_error = transition.error
        elif kind == "succeed":
            task.state = TaskState.SUCCEEDED
        else:
            task.state, task.last_error = TaskState.FAILED, transition.error
    return transition, applies
