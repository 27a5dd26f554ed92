"""Dispatch in process, on a real embedded store: how it takes what the timer fires."""
import asyncio
import dataclasses
import gc
import time

import grpc
import pytest

from taskwheel.config import Config
from taskwheel.core import shard_of
from taskwheel.dispatch import DispatchService, DispatchServicer
from taskwheel.dispatch.finished import FinishedMemory
from taskwheel.dispatch.service import BURST_CHUNK
from taskwheel.task import TaskRecord, TaskState
from taskwheel.stores.sqlite import SqliteStore
from taskwheel.stores.base import ShardLease
from taskwheel.timer import TimerService
from taskwheel.v1 import dispatch_pb2
from taskwheel.wire import ms_of

from tests.services.timers import QuietTimer


async def test_a_burst_of_fired_tasks_is_taken_over_several_turns_of_the_event_loop(tmp_path):
    # So that the first deliveries leave, and the timer's fire loop runs, before all are taken.
    now = time.time_ns() // 1_000_000
    burst = [TaskRecord(task_id=f"t{i}", shard=shard_of(f"t{i}", 4), queue="q", payload=b"",
                        fire_at_ms=now, due_ms=now) for i in range(2 * BURST_CHUNK + 1)]

    store = await opened_store(tmp_path)
    dispatch = DispatchService(Config(), store)
    seen = []

    async def watch():
        while True:
            seen.append(len(dispatch.state.waiting))
            await asyncio.sleep(0)

    watcher = asyncio.get_running_loop().create_task(watch())
    push = asyncio.get_running_loop().create_task(dispatch.push(burst, now))
    deadline = time.monotonic() + 10
    while len(dispatch.state.waiting) < len(burst) and time.monotonic() < deadline:
        await asyncio.sleep(0)
    push.cancel()  # no worker: it would wait for the tasks to be held
    watcher.cancel()
    await asyncio.gather(push, watcher, return_exceptions=True)
    await store.close()
    assert any(0 < n < len(burst) for n in seen), seen[:5]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def task(task_id: str, due_ms: int, **fields) -> TaskRecord:
    return TaskRecord(task_id=task_id, shard=shard_of(task_id, 4), queue="q", payload=b"p",
                      fire_at_ms=due_ms, due_ms=due_ms, **fields)


class Stream:
    """A Consume stream's requests, handed to the servicer as grpc.aio would."""

    def __init__(self) -> None:
        self._sent: asyncio.Queue = asyncio.Queue()

    def send(self, **msg) -> None:
        self._sent.put_nowait(dispatch_pb2.ConsumeRequest(**msg))

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._sent.get()


class Context:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


async def opened_store(tmp_path) -> SqliteStore:
    store = SqliteStore(tmp_path / "t.db", num_shards=4)
    await store.open()
    return store


async def subscribed(dispatch: DispatchService, max_in_flight: int = 100):
    stream = Stream()
    stream.send(subscribe=dispatch_pb2.Subscribe(queue="q", max_in_flight=max_in_flight))
    return stream, parsed(DispatchServicer(dispatch).Consume(stream, Context()))


async def parsed(responses):
    """The servicer's Consume yields wire bytes, as grpc sends them; a worker parses them."""
    try:
        async for data in responses:
            yield dispatch_pb2.ConsumeResponse.FromString(data)
    finally:
        await responses.aclose()


async def test_a_delivery_carries_its_fire_time_the_time_it_fired_and_its_lease_expiry(tmp_path):
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    early = task("early", fired_at - 1_500, lease_ms=7_000)
    late = task("late", fired_at - 1_499, lease_ms=9_000)
    await store.insert([early, late])
    dispatch = DispatchService(Config(), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push([early, late], fired_at))
    sent_after = now_ms()
    msg = await deliveries.__anext__()
    sent_before = now_ms()
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=[d.delivery_id for d in msg.deliveries]))
    await asyncio.wait_for(push, 5)
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    times = {d.task_id: (ms_of(d.fire_at), ms_of(d.fired_at), ms_of(d.lease_expires_at)) for d in msg.deliveries}
    assert times["early"][:2] == (times["early"][1] - 1_500, times["early"][1])
    assert times["late"][:2] == (times["late"][1] - 1_499, times["late"][1])
    assert sent_after - 5 <= times["early"][2] - 7_000 <= sent_before
    assert times["late"][2] - 9_000 == times["early"][2] - 7_000  # one message, one send time
    assert {d.delivery_id for d in msg.deliveries} == {"early.2", "late.2"}


async def test_a_push_returns_once_each_task_is_answered_or_leased_durably_the_last_one_included(tmp_path):
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    tasks = [task(f"t{i}", fired_at - 10) for i in range(5)]
    await store.insert(tasks)
    dispatch = DispatchService(Config(lease_write_delay_ms=50), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    started = time.monotonic()
    push = asyncio.get_running_loop().create_task(dispatch.push(tasks, fired_at))
    ids = sorted(d.delivery_id for d in (await deliveries.__anext__()).deliveries)
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=ids[:2]))
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=ids[2:4]))  # t4: left unanswered
    await asyncio.wait_for(push, 5)
    waited = time.monotonic() - started
    states = [(await store.get(t.task_id)).state for t in tasks]
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    assert waited >= 0.05  # the unanswered task's lease, written after the delay
    assert states == [TaskState.SUCCEEDED] * 4 + [TaskState.LEASED]


async def test_messages_queued_for_a_worker_while_one_is_written_go_out_as_one(tmp_path):
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    first = [task(f"a{i}", fired_at) for i in range(3)]
    second = [task(f"b{i}", fired_at) for i in range(2)]
    await store.insert(first + second)
    dispatch = DispatchService(Config(), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    receiving = asyncio.get_running_loop().create_task(deliveries.__anext__())
    while "q" not in dispatch.state.queues or not dispatch.state.queues["q"].consumers:
        await asyncio.sleep(0)
    dispatch.hand_over(first, fired_at)  # one message each, both queued before the stream runs
    dispatch.hand_over(second, fired_at)
    msg = await receiving
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    assert sorted(d.task_id for d in msg.deliveries) == ["a0", "a1", "a2", "b0", "b1"]


async def test_a_short_lease_is_written_by_half_its_length_whatever_the_delay(tmp_path):
    # Written later, the lease row would be due before it exists: a late redelivery.
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    short, long = task("short", fired_at, lease_ms=400), task("long", fired_at, lease_ms=60_000)
    await store.insert([short, long])
    dispatch = DispatchService(Config(lease_write_delay_ms=5_000), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    started = time.monotonic()
    push = asyncio.get_running_loop().create_task(dispatch.push([short], fired_at))
    await deliveries.__anext__()
    await asyncio.wait_for(push, 5)  # returns once the lease is durable
    waited = time.monotonic() - started
    lonely = asyncio.get_running_loop().create_task(dispatch.push([long], fired_at))
    await deliveries.__anext__()
    await asyncio.sleep(1)
    long_still_unwritten = not lonely.done()
    lonely.cancel()
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    assert 0.15 <= waited < 0.4
    assert long_still_unwritten  # a lease of its own length waits for the full delay


async def delivered_and_acked(dispatch: DispatchService, records, fired_at):
    """Pushes records, acks every delivery, returns once the push is confirmed."""
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push(records, fired_at))
    msg = await deliveries.__anext__()
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=[d.delivery_id for d in msg.deliveries]))
    await asyncio.wait_for(push, 5)
    return deliveries


@pytest.mark.parametrize("row", ["lease row", "copy of the delivered row"])
async def test_a_row_of_the_task_that_fires_after_its_ack_is_dropped_not_delivered_again(tmp_path, row):
    # The lease row, written before the ack came; or a copy of the delivered row that a load
    # read in the race, for which the ack forgot nothing in the timer (the delivered row had
    # fired).
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    rec = task("t1", fired_at - 10)
    await store.insert([rec])
    dispatch = DispatchService(Config(), store)
    await dispatch.start(QuietTimer())
    deliveries = await delivered_and_acked(dispatch, [rec], fired_at)
    late = rec if row != "lease row" else dataclasses.replace(
        rec, gen=2, attempt=2, due_ms=fired_at + 30_000)
    await asyncio.wait_for(dispatch.push([late], now_ms()), 5)  # confirmed at once
    again = asyncio.get_running_loop().create_task(deliveries.__anext__())
    await asyncio.sleep(0.2)
    redelivered = again.done()
    again.cancel()
    await dispatch.stop()
    await store.close()
    delivered = dispatch.delivered
    assert not redelivered
    assert delivered == 1


async def test_a_fresh_task_fired_beside_a_late_row_of_a_finished_one_is_delivered(tmp_path):
    # One fired batch: the late copy of an acked task first, a task never delivered after it.
    # The finished check, inlined in the batch's loop, drops the first and only the first.
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    done, fresh = task("done", fired_at - 10), task("fresh", fired_at - 10)
    await store.insert([done, fresh])
    dispatch = DispatchService(Config(), store)
    await dispatch.start(QuietTimer())
    deliveries = await delivered_and_acked(dispatch, [done], fired_at)
    push = asyncio.get_running_loop().create_task(dispatch.push([done, fresh], now_ms()))
    msg = await asyncio.wait_for(deliveries.__anext__(), 5)
    push.cancel()
    await dispatch.stop()
    await store.close()
    assert [d.task_id for d in msg.deliveries] == ["fresh"]


async def test_finished_tasks_are_remembered_for_finished_memory_ms_then_forgotten(tmp_path):
    store = await opened_store(tmp_path)
    first = [task(f"a{i}", now_ms() - 10) for i in range(3)]
    second = [task("b", now_ms() - 10)]
    await store.insert(first + second)
    dispatch = DispatchService(Config(finished_memory_ms=300), store)
    await dispatch.start(QuietTimer())
    await (await delivered_and_acked(dispatch, first, now_ms())).aclose()
    remembered = set(dispatch.finished)
    await asyncio.sleep(0.4)
    await (await delivered_and_acked(dispatch, second, now_ms())).aclose()
    await dispatch.stop()
    await store.close()
    after = set(dispatch.finished)
    assert remembered == {"a0", "a1", "a2"}
    assert after == {"b"}


def test_finished_memory_answers_a_task_s_latest_finish_across_generations():
    memory = FinishedMemory(800)  # generations of 100 ms
    memory.adding(1_000)["t"] = 1
    memory.adding(1_050)["u"] = 5
    memory.adding(1_250)["t"] = 2  # finished again, two generations later
    assert (memory.get("t"), memory.get("u"), memory.get("never")) == (2, 5, 0)
    assert sorted(memory) == ["t", "t", "u"]


def test_finished_memory_s_lookup_list_follows_generations_added_and_dropped_after_it_was_taken():
    # _take_fired takes the list once per batch and may finish a task of the batch (a lease
    # that expired on the last attempt) before it looks up the next record.
    memory = FinishedMemory(800)  # generations of 100 ms
    memory.adding(1_000)["a"] = 1
    generations = memory.newest_first()
    memory.adding(2_000)["b"] = 2  # a generation begun
    memory.forget_before(2_000 - 800, 1)  # the one of 1,000 dropped
    assert [entries.get("b") for entries in generations] == [2]
    memory.adding(2_100)["c"] = 3
    assert [entries.get("c") for entries in generations] == [3, None]


def test_finished_memory_keeps_a_task_at_least_memory_ms_and_at_most_one_generation_more():
    memory = FinishedMemory(800)
    memory.adding(1_000)["early"] = 1
    memory.adding(1_099)["late"] = 2  # the same generation, [1000, 1100)
    memory.forget_before(1_899 - 800, 1)  # at 1,899 "late" finished 800 ms ago, "early" 899: kept
    assert (memory.get("early"), memory.get("late")) == (1, 2)
    memory.forget_before(1_900 - 800, 1)  # at 1,900 the generation's every entry is over 800 ms old
    assert (memory.get("early"), memory.get("late")) == (0, 0)


def test_finished_memory_frees_a_dropped_generation_a_chunk_per_call():
    memory = FinishedMemory(800)
    chunk = FinishedMemory._EMPTIED_PER_CALL
    old = memory.adding(1_000)
    old.update((f"t{i}", 1) for i in range(2 * chunk + 1))
    memory.adding(5_000)["new"] = 1
    memory.forget_before(5_000 - 800, 1)
    assert memory.get("t0") == 0 and memory.get("new") == 1
    assert len(old) == chunk + 1  # dropped at once, freed over several calls, not one long one
    memory.forget_before(5_000 - 800, 1)
    memory.forget_before(5_000 - 800, 1)
    assert len(old) == 0 and list(memory) == ["new"]


def test_finished_memory_frees_as_fast_as_acks_come_however_many_a_message_carries():
    memory = FinishedMemory(800)  # generations of 100 ms
    per_message = 3 * FinishedMemory._EMPTIED_PER_CALL
    most_dropped = 0
    for ms in range(0, 20_000, 50):  # two ack messages a generation
        entries = memory.adding(ms)
        entries.update((f"t{ms}.{i}", 1) for i in range(per_message))
        memory.forget_before(ms - 800, per_message)
        most_dropped = max(most_dropped, sum(len(d) for d in memory._dropped))
    assert most_dropped <= 2 * per_message  # one generation at most, never growing


def test_a_generation_of_finished_tasks_holds_only_its_span_of_finishes():
    """The point of the generations: no dict holds more than memory_ms / GENERATIONS of acks,
    so none is ever rebuilt with the whole memory in it."""
    memory = FinishedMemory(8_000)
    for ms in range(0, 40_000, 10):
        memory.adding(ms)[f"t{ms}"] = 1
        memory.forget_before(ms - 8_000, 1)
    sizes = [len(entries) for entries in memory.newest_first()]
    assert max(sizes) == 1_000 / 10 and len(sizes) <= FinishedMemory.GENERATIONS + 1


class GatedStore(SqliteStore):
    """The embedded store, its transitions held back until the test opens the gate."""

    gate: asyncio.Event

    async def apply(self, transitions, now_ms):
        await self.gate.wait()
        return await super().apply(transitions, now_ms)


async def timer_taking_offers(config, store, dispatch, until_ms: int) -> TimerService:
    """An in-process timer whose loops are not running: it holds every shard (without leases:
    nothing else runs) and takes the offers due before until_ms."""
    timer = TimerService(config, store, dispatch)
    timer.loaded_until_ms = until_ms
    await timer.take([ShardLease(s, "node", 1, 0, until_ms) for s in range(store.num_shards)], {})
    return timer


async def delivered_beside_a_timer(store):
    """A task pushed to dispatch and received, with an in-process timer whose loops are not
    running (it takes offers); leases are queued for writing as they are sent."""
    fired_at = now_ms()
    rec = task("t1", fired_at - 10, lease_ms=10_000)
    await store.insert([rec])
    config = Config(lease_write_delay_ms=0)
    dispatch = DispatchService(config, store)
    timer = await timer_taking_offers(config, store, dispatch, until_ms=fired_at + 60_000)
    await dispatch.start(timer)
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push([rec], fired_at))
    return dispatch, timer, stream, deliveries, push, await deliveries.__anext__()


async def test_a_lease_row_answered_before_its_write_is_durable_is_not_offered_to_the_timer(tmp_path):
    store = GatedStore(tmp_path / "t.db", num_shards=4)
    store.gate = asyncio.Event()
    await store.open()
    dispatch, timer, stream, deliveries, push, msg = await delivered_beside_a_timer(store)
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=[msg.deliveries[0].delivery_id]))
    while dispatch.acked < 1:
        await asyncio.sleep(0.01)
    store.gate.set()  # the lease, then the ack, become durable
    await asyncio.wait_for(push, 5)
    while (await store.get("t1")).state != TaskState.SUCCEEDED:
        await asyncio.sleep(0.01)
    held = list(timer.pending.records())
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    assert held == []


async def test_an_in_process_timer_holds_a_written_lease_row_until_the_ack_takes_it_out(tmp_path):
    store = await opened_store(tmp_path)
    dispatch, timer, stream, deliveries, push, msg = await delivered_beside_a_timer(store)
    await asyncio.wait_for(push, 5)  # the lease is durable, its row offered
    held_while_leased = [(r.task_id, r.gen, r.attempt) for r in timer.pending.records()]
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=[msg.deliveries[0].delivery_id]))
    while dispatch.acked < 1:
        await asyncio.sleep(0.01)
    held_after_ack = list(timer.pending.records())
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    pending = len(timer.wheel)
    assert held_while_leased == [("t1", 2, 2)]
    assert (held_after_ack, pending) == ([], 0)


async def test_only_fired_tasks_no_worker_took_are_left_for_the_hold_loop(tmp_path):
    # The hold loop looks up every task it is given, hold_after_ms later: one sent to a worker
    # as it was taken must not be among them.
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    dispatch = DispatchService(Config(), store)
    stream, deliveries = await subscribed(dispatch, max_in_flight=1)
    first = asyncio.get_running_loop().create_task(deliveries.__anext__())
    while not dispatch._queue("q").consumers:
        await asyncio.sleep(0)
    dispatch.hand_over([task("sent", fired_at - 2), task("waits", fired_at - 1)], fired_at)
    msg = await asyncio.wait_for(first, 5)
    left = [(since, list(ids)) for since, ids in dispatch._unheld]
    await deliveries.aclose()
    await store.close()
    delivered = [d.task_id for d in msg.deliveries]
    assert delivered == ["sent"]
    assert len(left) == 1 and left[0][1] == ["waits"] and left[0][0] >= fired_at


async def test_a_task_held_until_a_worker_came_leaves_no_hold_row_in_the_timer_once_acked(tmp_path):
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    rec = task("t1", fired_at - 10)
    await store.insert([rec])
    config = Config(hold_after_ms=50, hold_ms=60_000)
    dispatch = DispatchService(config, store)
    timer = await timer_taking_offers(config, store, dispatch, until_ms=fired_at + 120_000)
    await dispatch.start(timer)
    push = asyncio.get_running_loop().create_task(dispatch.push([rec], fired_at))
    await asyncio.wait_for(push, 5)  # returns once the hold row is durable
    while not len(timer.pending):
        await asyncio.sleep(0.01)
    held = [(r.task_id, r.gen) for r in timer.pending.records()]
    stream, deliveries = await subscribed(dispatch)
    msg = await deliveries.__anext__()
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=[d.delivery_id for d in msg.deliveries]))
    while dispatch.acked < 1:
        await asyncio.sleep(0.01)
    left = list(timer.pending.records())
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    delivered = [d.delivery_id for d in msg.deliveries]
    pending = len(timer.wheel)
    assert held == [("t1", 2)]
    assert delivered == ["t1.3"]
    assert (left, pending) == ([], 0)


class ApplyRecordingStore(SqliteStore):
    """Records, for every transition it is asked to apply, whether the cyclic GC tracks it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracked = []

    async def apply(self, transitions, now_ms):
        self.tracked.extend(gc.is_tracked(t) for t in transitions)
        return await super().apply(transitions, now_ms)


async def test_writes_waiting_for_the_store_are_out_of_the_cyclic_gcs_view(tmp_path):
    # A writer that falls behind holds a second of acks; young collections walked them all.
    store = ApplyRecordingStore(tmp_path / "t.db", num_shards=4)
    await store.open()
    fired_at = now_ms()
    tasks = [task(f"t{i}", fired_at - 10) for i in range(6)]
    await store.insert(tasks)
    dispatch = DispatchService(Config(lease_write_delay_ms=20), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push(tasks, fired_at))
    ids = sorted(d.delivery_id for d in (await deliveries.__anext__()).deliveries)
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=ids[:3]))  # the rest: leases written
    await asyncio.wait_for(push, 5)
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=ids[3:]))
    while dispatch.acked < 6:
        await asyncio.sleep(0.01)
    states = [(await store.get(t.task_id)).state for t in tasks]
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    tracked = store.tracked
    assert len(tracked) == 9 and not any(tracked)  # 6 acks and 3 leases, none tracked
    assert states == [TaskState.SUCCEEDED] * 6


async def test_no_worker_or_delivery_outlives_its_stream_with_fired_tasks_out_of_the_gcs_view(tmp_path):
    # Fired tasks are untracked: a cycle through one (its consumer's in_flight holds it) would
    # never be collected, keeping the worker's whole state alive.
    from taskwheel.dispatch.service import Consumer

    def consumers_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Consumer)

    store = await opened_store(tmp_path)
    fired_at = now_ms()
    tasks = [task(f"t{i}", fired_at - 10) for i in range(8)]
    await store.insert(tasks)
    config = Config(lease_write_delay_ms=20, orphan_grace_ms=50, retry_base_ms=10)
    dispatch = DispatchService(config, store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push(tasks, fired_at))
    ids = sorted(d.delivery_id for d in (await deliveries.__anext__()).deliveries)
    stream.send(ack=dispatch_pb2.Ack(delivery_ids=ids[:4]))  # the rest left in flight
    await asyncio.wait_for(push, 5)
    while dispatch.acked < 4:
        await asyncio.sleep(0.01)
    during = consumers_alive()
    await deliveries.aclose()  # the worker goes with four deliveries in flight
    await asyncio.sleep(0.3)  # past the orphan grace: they are retried
    after = consumers_alive()
    await dispatch.stop()
    await store.close()
    assert (during, after) == (1, 0)
    assert dispatch.acked == 4 and not dispatch.state.leases


async def test_an_orphan_acked_on_the_workers_next_stream_is_done_and_only_the_other_is_retried(tmp_path):
    store = await opened_store(tmp_path)
    fired_at = now_ms()
    tasks = [task(f"t{i}", fired_at - 10) for i in range(2)]
    await store.insert(tasks)
    dispatch = DispatchService(Config(orphan_grace_ms=100, retry_base_ms=10), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push(tasks, fired_at))
    ids = sorted(d.delivery_id for d in (await deliveries.__anext__()).deliveries)
    await deliveries.aclose()  # the worker's stream breaks with both in flight ...
    again, second = await subscribed(dispatch)
    reading = asyncio.get_running_loop().create_task(second.__anext__())  # the stream runs
    again.send(ack=dispatch_pb2.Ack(delivery_ids=ids[:1]))  # ... it comes back and acks one
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = [await store.get(t.task_id) for t in tasks]
        if rows[1].attempt > 1:
            break
        await asyncio.sleep(0.02)
    await asyncio.wait_for(push, 5)
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await second.aclose()
    await dispatch.stop()
    await store.close()
    acked, orphan = rows
    assert ids == ["t0.2", "t1.2"]
    assert acked.state is TaskState.SUCCEEDED and dispatch.acked == 1
    assert (orphan.state, orphan.attempt, orphan.last_error) == (TaskState.SCHEDULED, 2, "worker disconnected")


# -- the fired tasks take_fired passes back to the servicer (redeliveries, copies, new queues) --

async def leased(tmp_path, max_attempts: int = 3):
    """A store, a dispatch writing leases at once, a worker, and task t delivered to it and
    not answered, its lease row durable: (store, dispatch, stream, deliveries, lease row)."""
    store = await opened_store(tmp_path)
    rec = task("t", now_ms() - 10, max_attempts=max_attempts, lease_ms=60_000)
    await store.insert([rec])
    dispatch = DispatchService(Config(lease_write_delay_ms=0), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch)
    push = asyncio.get_running_loop().create_task(dispatch.push([rec], now_ms()))
    first = await asyncio.wait_for(deliveries.__anext__(), 5)
    await asyncio.wait_for(push, 5)  # the lease row is durable
    assert [d.delivery_id for d in first.deliveries] == ["t.2"]
    return store, dispatch, stream, deliveries, await store.get("t")


async def delivers_more(deliveries, within_s: float = 0.1) -> bool:
    """Whether another message arrives on the stream within ``within_s``."""
    again = asyncio.get_running_loop().create_task(deliveries.__anext__())
    await asyncio.sleep(within_s)
    arrived = again.done()
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)
    return arrived


async def closed(store, dispatch, deliveries):
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()


async def test_a_lease_row_that_fires_redelivers_the_task_with_its_next_attempt(tmp_path):
    store, dispatch, stream, deliveries, lease_row = await leased(tmp_path)
    dispatch.hand_over([lease_row], now_ms())
    again = await asyncio.wait_for(deliveries.__anext__(), 5)
    leases = dict(dispatch.state.leases)
    await closed(store, dispatch, deliveries)
    redelivered = dispatch.redelivered
    assert (lease_row.gen, lease_row.attempt, lease_row.state) == (2, 2, TaskState.LEASED)
    assert [(d.delivery_id, d.attempt) for d in again.deliveries] == [("t.3", 2)]
    assert redelivered == 1 and [lease.delivery_id for lease in leases.values()] == ["t.3"]


async def test_a_stale_copy_of_a_delivered_row_is_confirmed_and_not_delivered_again(tmp_path):
    store, dispatch, stream, deliveries, lease_row = await leased(tmp_path)
    stale = dataclasses.replace(lease_row, gen=1, attempt=1)
    await asyncio.wait_for(dispatch.hand_over([stale], now_ms()), 5)  # confirmed at once
    redelivered = await delivers_more(deliveries)
    await closed(store, dispatch, deliveries)
    assert (redelivered, dispatch.delivered, dispatch.redelivered) == (False, 1, 0)


async def test_a_lease_that_expires_on_the_last_attempt_fails_the_task(tmp_path):
    store, dispatch, stream, deliveries, lease_row = await leased(tmp_path, max_attempts=1)
    await asyncio.wait_for(dispatch.hand_over([lease_row], now_ms()), 5)
    ended = await store.get("t")
    await closed(store, dispatch, deliveries)
    delivered = dispatch.delivered
    leases = dispatch.state.leases
    assert (ended.state, ended.last_error) == (TaskState.FAILED, "lease expired on the last attempt")
    assert delivered == 1 and leases == {}


async def test_a_reloaded_copy_adds_its_batch_to_its_own_task_not_to_the_others_of_its_first_take(tmp_path):
    store = await opened_store(tmp_path)
    recs = [task("w", now_ms() - 10), task("v", now_ms() - 10)]
    await store.insert(recs)
    dispatch = DispatchService(Config(lease_write_delay_ms=0), store)
    await dispatch.start(QuietTimer())
    first = dispatch.hand_over(recs, now_ms())  # no worker yet: both wait
    copy = dispatch.hand_over([dataclasses.replace(recs[0])], now_ms())
    counts = [len(dispatch.state.waiting[t].batches) for t in ("w", "v")]
    stream, deliveries = await subscribed(dispatch)
    msg = await asyncio.wait_for(deliveries.__anext__(), 5)
    await asyncio.wait_for(asyncio.gather(first, copy), 5)
    await closed(store, dispatch, deliveries)
    assert (counts, sorted(d.task_id for d in msg.deliveries)) == ([2, 1], ["v", "w"])


async def test_a_reloaded_copy_of_a_task_waiting_for_its_queues_first_worker_is_delivered_once(tmp_path):
    store = await opened_store(tmp_path)
    rec = task("w", now_ms() - 10)
    await store.insert([rec])
    dispatch = DispatchService(Config(lease_write_delay_ms=0), store)
    await dispatch.start(QuietTimer())
    first = dispatch.hand_over([rec], now_ms())  # queue q not seen yet: no worker has come
    copy = dispatch.hand_over([dataclasses.replace(rec)], now_ms())
    ready = len(dispatch.state.queues["q"].ready)
    stream, deliveries = await subscribed(dispatch)
    msg = await asyncio.wait_for(deliveries.__anext__(), 5)
    await asyncio.wait_for(asyncio.gather(first, copy), 5)  # both confirmed by the lease
    twice = await delivers_more(deliveries)
    await closed(store, dispatch, deliveries)
    assert (ready, [d.delivery_id for d in msg.deliveries], twice) == (1, ["w.2"], False)


@pytest.mark.parametrize("asked, served", [(0, 100), (1, 1), (10_000, 10_000)])
async def test_max_in_flight_zero_or_unset_is_the_server_default_and_the_limit_is_allowed(tmp_path, asked, served):
    store = await opened_store(tmp_path)
    dispatch = DispatchService(Config(), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch, max_in_flight=asked)
    fetch = asyncio.ensure_future(deliveries.__anext__())  # runs the stream up to its first wait
    while not dispatch.queues().get("q") or not dispatch.queues()["q"].consumers:
        await asyncio.sleep(0.001)
    got = dispatch.queues()["q"].consumers[0].max_in_flight
    fetch.cancel()
    await asyncio.gather(fetch, return_exceptions=True)
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
    assert got == served


async def test_max_in_flight_over_the_limit_is_refused_naming_the_field(tmp_path):
    class Refusal(Exception):
        pass

    class Aborting(Context):
        async def abort(self, code, details):
            raise Refusal(code, details)

    store = await opened_store(tmp_path)
    dispatch = DispatchService(Config(), store)
    stream = Stream()
    stream.send(subscribe=dispatch_pb2.Subscribe(queue="q", max_in_flight=10_001))
    with pytest.raises(Refusal) as refused:
        await DispatchServicer(dispatch).Consume(stream, Aborting()).__anext__()
    await store.close()
    code, details = refused.value.args
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_in_flight" in details


async def test_tasks_waiting_for_a_worker_are_taken_back_whole_and_never_held_here(tmp_path):
    # For the cluster: a worker of their queue connected on another node.
    store = await opened_store(tmp_path)
    dispatch = DispatchService(Config(hold_after_ms=50), store)
    await dispatch.start(QuietTimer())
    now = now_ms()
    handed = dispatch.hand_over([task("t1", now), task("t2", now)], now)
    taken = dispatch.take_back("q")
    await asyncio.sleep(0.3)  # past hold_after_ms: a task still here would get a hold row now
    assert [f.record.task_id for f in taken] == ["t1", "t2"]
    assert dispatch.take_back("q") == [] and not dispatch.state.waiting
    assert not handed.done()  # the taker confirms them, once they are leased or held elsewhere
    for fired in taken:
        for batch in fired.batches:
            batch.done_one()
    assert handed.done()
    assert (await store.get("t1")) is None  # nothing written here for them
    await dispatch.stop()
    await store.close()


async def test_nothing_is_taken_back_from_a_queue_with_a_worker_here(tmp_path):
    store = await opened_store(tmp_path)
    dispatch = DispatchService(Config(), store)
    await dispatch.start(QuietTimer())
    stream, deliveries = await subscribed(dispatch, max_in_flight=1)
    now = now_ms()
    dispatch.hand_over([task("t1", now), task("t2", now)], now)
    await deliveries.__anext__()  # t1 sent; t2 waits for room with this worker
    assert dispatch.take_back("q") == [] and "t2" in dispatch.state.waiting
    await deliveries.aclose()
    await dispatch.stop()
    await store.close()
