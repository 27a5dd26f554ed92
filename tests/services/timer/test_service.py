"""The timer on a real embedded store, in process: loading, firing, forgetting, checkpoints,
and the shards it holds (taken, given up, lost, fenced).

The timer runs on a fake clock (taskwheel.clock.FakeClock): time moves only as a test moves
it, so what a test sees does not depend on how busy the machine is. It holds its shards
through a real ShardOwner on the same store and clock, as in a server."""
import asyncio
import logging
import time

from taskwheel.clock import FakeClock
from taskwheel.cluster.shards import ShardOwner
from taskwheel.config import Config
from taskwheel.core import shard_of
from taskwheel.stores.base import ShardLease
from taskwheel.task import TaskRecord
from taskwheel.stores.sqlite import SqliteStore
from taskwheel.timer import TimerService

SHARDS = 4


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class CountingStore(SqliteStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    async def load_due(self, shard, from_ms, to_ms):
        self.reads.append((shard, from_ms, to_ms))
        return await super().load_due(shard, from_ms, to_ms)


class RecordingDispatch:
    """Confirms pushes at once (or never, with hold=True), recording when each task came."""

    def __init__(self, hold: bool = False):
        self.fired = []
        self.hold = hold

    def hand_over(self, records, fired_at_ms):
        return asyncio.ensure_future(self._push(records, fired_at_ms))

    async def _push(self, records, fired_at_ms):
        self.fired.extend((r.task_id, r.due_ms, fired_at_ms) for r in records)
        if self.hold:
            await asyncio.Event().wait()


def task(task_id: str, due_ms: int) -> TaskRecord:
    return TaskRecord(task_id=task_id, shard=shard_of(task_id, SHARDS), queue="q", payload=b"",
                      fire_at_ms=due_ms, due_ms=due_ms, created_ms=now_ms())


async def until_loaded(timer, clock: FakeClock, ms: int) -> None:
    await clock.run_until(lambda: timer.loaded_until_ms > ms)


def config(**overrides) -> Config:
    cfg = Config(lookahead_ms=2_000, slice_ms=500, shard_renew_ms=100, shard_lease_ms=1_000, checkpoint_margin_ms=0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


async def joined(timer: TimerService, store, clock: FakeClock, cfg=None, node_id="node-test") -> ShardOwner:
    """The timer's node joins the cluster of its store (alone: it takes every shard)."""
    owner = ShardOwner(cfg or config(), store, node_id, "127.0.0.1:1", frozenset({"timer"}), timer, clock=clock)
    await owner.start()
    return owner


async def leave(owner: ShardOwner, timer: TimerService, clock: FakeClock) -> None:
    """The node stops: hands its shards over (draining on the clock's time), then the timer."""
    stopping = asyncio.ensure_future(owner.stop())
    await clock.run_until(stopping.done, real_timeout_s=30)
    await stopping
    await timer.stop()


async def hold_every_shard(timer: TimerService, num_shards: int = SHARDS) -> None:
    """Holds every shard from the loaded window on, without a store's leases (for tests of the
    loader and the wheel alone)."""
    await timer.take([ShardLease(s, "node-test", 1, 0, timer.loaded_until_ms) for s in range(num_shards)], {})
    timer.fire_until(2**62)


async def run_timer(store, dispatch, seconds, cfg=None, before=None, clock=None):
    """Runs a timer for ``seconds`` of a fake clock's time (``clock``, or a new one)."""
    await store.open()
    if before:
        await before(store)
    clock = clock or FakeClock(now_ms())
    timer = TimerService(cfg or config(), store, dispatch, clock)
    await timer.start()
    owner = await joined(timer, store, clock, cfg)
    await clock.run_for(int(seconds * 1000))
    await leave(owner, timer, clock)
    await store.close()
    return timer


async def test_the_loader_reads_each_shard_once_per_slice_not_in_a_trickle(tmp_path):
    store = CountingStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    await run_timer(store, RecordingDispatch(), 3.0)
    live = [r for r in store.reads if r[2] - r[1] == 500]
    # 3 s of 500 ms slices, plus the first window, per shard; never dozens of small reads.
    assert len(store.reads) <= SHARDS * (3 * 2 + 6)
    assert len(live) >= SHARDS * 5
    assert all(to % 500 == 0 for _, _, to in store.reads)


async def test_tasks_in_the_store_fire_at_their_due_time_never_early(tmp_path):
    store = SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    start = now_ms() + 300
    tasks = [task(f"{i:028x}", start + i * 7) for i in range(300)]

    async def insert(st):
        await st.insert(tasks)

    dispatch = RecordingDispatch()
    await run_timer(store, dispatch, 3.5, before=insert)
    assert sorted(t for t, _, _ in dispatch.fired) == sorted(t.task_id for t in tasks)
    assert all(fired >= due for _, due, fired in dispatch.fired)


async def test_an_offered_task_inside_the_loaded_window_fires_without_a_store_read(tmp_path):
    store = CountingStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    dispatch = RecordingDispatch()
    await store.open()
    clock = FakeClock(now_ms())
    timer = TimerService(config(), store, dispatch, clock)
    await timer.start()
    owner = await joined(timer, store, clock)
    await until_loaded(timer, clock, clock.now_ms() + 300)
    rec = task("offered".ljust(28, "0"), clock.now_ms() + 200)  # never written: only offered
    timer.offer([rec])
    await clock.run_for(600)
    await leave(owner, timer, clock)
    await store.close()
    assert [t for t, _, _ in dispatch.fired] == [rec.task_id]


async def test_a_forgotten_task_does_not_fire(tmp_path):
    store = SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    dispatch = RecordingDispatch()
    await store.open()
    clock = FakeClock(now_ms())
    timer = TimerService(config(), store, dispatch, clock)
    await timer.start()
    owner = await joined(timer, store, clock)
    due = clock.now_ms() + 300
    keep, drop = task("a".ljust(28, "0"), due), task("b".ljust(28, "0"), due)
    await store.insert([keep, drop])  # as ingest does: durable first, then offered
    timer.offer([keep, drop])
    await store.cancel(drop.task_id, clock.now_ms())  # as ingest's Cancel does: store, then timer
    timer.forget([drop.task_id])
    await clock.run_for(700)
    await leave(owner, timer, clock)
    await store.close()
    assert [t for t, _, _ in dispatch.fired] == ["a".ljust(28, "0")]


class HeldReadStore(SqliteStore):
    """Once ``hold`` is set, a read of ``hold_shard`` finds its rows, then waits to return them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold: asyncio.Event | None = None
        self.hold_shard = -1
        self.read_found: asyncio.Event | None = None

    async def load_due(self, shard, from_ms, to_ms):
        rows = await super().load_due(shard, from_ms, to_ms)
        if self.hold is not None and shard == self.hold_shard and rows:
            self.read_found.set()
            await self.hold.wait()
        return rows


async def test_a_task_cancelled_while_its_slice_is_read_does_not_come_back_from_the_read(tmp_path):
    store = HeldReadStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    dispatch = RecordingDispatch()
    keep_id, drop_id = "a".ljust(28, "0"), "b".ljust(28, "0")
    await store.open()
    clock = FakeClock(now_ms())
    timer = TimerService(config(), store, dispatch, clock)
    await timer.start()
    owner = await joined(timer, store, clock)
    await until_loaded(timer, clock, clock.now_ms() + 1_400)  # the window is full: slices come one by one
    # Due two slices past the loaded window: the loader reads it (not an offer), and not
    # before the insert below is written.
    due = timer.loaded_until_ms + 600
    keep, drop = task(keep_id, due), task(drop_id, due)
    store.hold, store.read_found, store.hold_shard = asyncio.Event(), asyncio.Event(), drop.shard
    await store.insert([keep, drop])
    await clock.run_until(store.read_found.is_set)  # the read has found both rows
    await store.cancel(drop_id, clock.now_ms())  # as ingest's Cancel does: store, then timer
    assert timer._forget([drop_id]) == 0  # not in the wheel yet: the read still holds it
    store.hold.set()
    await clock.run_until(lambda: clock.now_ms() >= due + 300)
    await leave(owner, timer, clock)
    await store.close()
    assert [t for t, _, _ in dispatch.fired] == [keep_id]


async def test_forget_counts_the_tasks_it_took_out_of_the_wheel_and_leaves_the_rest(tmp_path):
    store = SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    await store.open()
    timer = TimerService(config(), store, RecordingDispatch())
    timer.loaded_until_ms = now_ms() + 60_000  # offers are taken without a running loader
    await hold_every_shard(timer)
    due = now_ms() + 30_000
    timer._offer([task(f"{i:028x}", due + i) for i in range(4)])
    forgotten = timer._forget([f"{1:028x}", f"{3:028x}", "never-offered", f"{3:028x}"])
    pending, left = len(timer.wheel), sorted(rec.task_id for rec in timer.pending.records())
    await store.close()
    assert (forgotten, pending) == (2, 2)
    assert left == [f"{0:028x}", f"{2:028x}"]


async def test_the_checkpoint_stays_below_a_fired_task_dispatch_has_not_confirmed(tmp_path):
    path = str(tmp_path / "t.db")
    due = now_ms() + 200

    async def insert(st):
        await st.insert([task("held".ljust(28, "0"), due)])

    dispatch = RecordingDispatch(hold=True)
    await run_timer(SqliteStore(path, num_shards=SHARDS), dispatch, 1.5, before=insert)
    assert len(dispatch.fired) == 1

    st = SqliteStore(path, num_shards=SHARDS)
    await st.open()
    checkpoints = [await st.load_checkpoint(s) for s in range(SHARDS)]
    await st.close()
    assert max(checkpoints) <= due
    # A new timer on the same store fires it again: nothing confirmed is lost.
    again = RecordingDispatch()
    await run_timer(SqliteStore(path, num_shards=SHARDS), again, 1.0)
    assert [t for t, _, _ in again.fired] == ["held".ljust(28, "0")]


async def test_the_checkpoint_advances_when_everything_is_confirmed(tmp_path):
    path = str(tmp_path / "t.db")
    store = SqliteStore(path, num_shards=SHARDS)
    started = now_ms()
    timer = await run_timer(store, RecordingDispatch(), 1.5)
    assert timer.checkpoint_ms >= started


class GatedStore(SqliteStore):
    """Holds every load_due until ``gate`` is set, so a test can look at the timer mid-read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def load_due(self, shard, from_ms, to_ms):
        self.reading.set()
        await self.gate.wait()
        return await super().load_due(shard, from_ms, to_ms)


async def test_the_checkpoint_stays_at_a_slice_being_read_even_when_catching_up(tmp_path):
    # Catching up after downtime, the slice being read lies below now - margin: a checkpoint
    # taken then must not pass tasks that are read but not yet in the wheel.
    store = GatedStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    overdue = now_ms() - 30_000
    await store.open()
    await store.insert([task("late".ljust(28, "0"), overdue)])
    timer = TimerService(config(), store, RecordingDispatch())
    timer.loaded_until_ms = overdue - 1_000
    await hold_every_shard(timer)
    loading = asyncio.ensure_future(timer._load_once())
    await store.reading.wait()
    during = timer.checkpoint(now_ms())
    store.gate.set()
    await loading
    after = timer.checkpoint(now_ms())
    await store.close()
    assert during <= overdue - 1_000
    assert after <= overdue  # the task is in the wheel now: its due time holds the checkpoint


async def test_a_stop_in_the_middle_of_a_read_leaves_the_slice_to_be_read_again(tmp_path):
    store = GatedStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    start = now_ms() - 30_000
    await store.open()
    timer = TimerService(config(), store, RecordingDispatch())
    timer.loaded_until_ms = start
    await hold_every_shard(timer)
    loading = asyncio.ensure_future(timer._load_once())
    await store.reading.wait()
    loading.cancel()
    try:
        await loading
    except asyncio.CancelledError:
        pass
    await store.close()
    assert timer.loaded_until_ms == start
    assert timer.checkpoint(now_ms()) <= start


async def test_a_large_slice_enters_the_wheel_in_chunks_letting_the_loop_run_between(tmp_path):
    from taskwheel.timer.servicer import ADMIT_CHUNK

    store = SqliteStore(str(tmp_path / "t.db"), num_shards=1)
    due = now_ms() + 200  # inside the lookahead; no fire loop runs here
    n = 3 * ADMIT_CHUNK + 5
    await store.open()
    await store.insert([TaskRecord(task_id=f"{i:028x}", shard=0, queue="q", payload=b"",
                                   fire_at_ms=due, due_ms=due) for i in range(n)])
    timer = TimerService(config(), store, RecordingDispatch())
    timer.loaded_until_ms = due - due % 500
    await hold_every_shard(timer, 1)
    sizes = []

    async def watch():  # one look per turn of the loop
        while True:
            sizes.append(len(timer.wheel))
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    await timer._load_once()
    watcher.cancel()
    await store.close()
    assert len(timer.wheel) == n
    partial = sorted({s for s in sizes if 0 < s < n})
    assert partial[:3] == [ADMIT_CHUNK, 2 * ADMIT_CHUNK, 3 * ADMIT_CHUNK]


class SlowTakingDispatch:
    """Takes fired tasks in the caller's turn, holding the event loop ``take_ms`` per batch of
    the clock's time, as dispatch's take, pump and encode do under load."""

    def __init__(self, take_ms: int, clock: FakeClock):
        self.take_ms = take_ms
        self.clock = clock
        self.fired = []

    def hand_over(self, records, fired_at_ms):
        self.fired.extend((r.task_id, r.due_ms, fired_at_ms) for r in records)
        self.clock.pass_time(self.take_ms)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_the_fire_loop_lets_the_event_loop_run_while_tasks_keep_falling_due(tmp_path):
    # One task due each millisecond for 150 ms, each batch taking 3 x FIRE_TURN_MS to hand
    # over: the fire loop never catches up, and before it yielded only once it had, so nothing
    # else ran (a worker's deliveries and acks) until the stream of due tasks ended.
    from taskwheel.timer.servicer import FIRE_TURN_MS

    store = SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    clock = FakeClock(now_ms())
    dispatch = SlowTakingDispatch(3 * FIRE_TURN_MS, clock)
    first = clock.now_ms() + 400
    tasks = [task(f"t{i:03d}", first + i) for i in range(150)]
    turns_while_firing = []

    async def before(store):
        await store.insert(tasks)

    async def watch():  # one look per turn of the loop
        while True:
            if 0 < len(dispatch.fired) < len(tasks):
                turns_while_firing.append(len(dispatch.fired))
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    await run_timer(store, dispatch, 1.2, before=before, clock=clock)
    watcher.cancel()
    assert sorted(t for t, _, _ in dispatch.fired) == [t.task_id for t in tasks]
    assert all(fired_at >= due for _, due, fired_at in dispatch.fired)
    assert len(set(turns_while_firing)) >= 10, turns_while_firing


# -- retries: a store read or a hand-over that fails is tried again, on the timer's clock ------

class FlakyStore:
    """One shard and no tasks; each read fails while ``failures`` is above zero."""

    num_shards = 1

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.failures = 0
        self.failed_at: list[int] = []
        self.read_at: list[int] = []

    async def load_due(self, shard, from_ms, to_ms):
        if self.failures:
            self.failures -= 1
            self.failed_at.append(self.clock.now_ms())
            raise OSError("store down")
        self.read_at.append(self.clock.now_ms())
        return []


async def test_a_failed_read_is_retried_after_doubling_waits_each_failure_logged(caplog):
    clock = FakeClock()
    store = FlakyStore(clock)
    timer = TimerService(config(), store, RecordingDispatch(), clock)
    timer.loaded_until_ms = t0 = clock.now_ms()
    await hold_every_shard(timer, 1)
    store.failures = 4
    with caplog.at_level(logging.WARNING, logger="taskwheel.timer"):
        loading = asyncio.get_running_loop().create_task(timer._load_loop())
        await clock.advance(0)  # the loop runs its first read now
        await clock.advance(1_000)
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    assert [at - t0 for at in store.failed_at] == [0, 50, 150, 350]
    assert store.read_at[0] - t0 == 750
    assert [r.getMessage() for r in caplog.records] == [
        f"loading due tasks failed, retrying in {wait}: store down" for wait in ("0.05s", "0.10s", "0.20s", "0.40s")]


async def test_the_wait_after_a_failed_read_starts_again_at_50ms_once_a_read_succeeds(caplog):
    clock = FakeClock()
    store = FlakyStore(clock)
    timer = TimerService(config(), store, RecordingDispatch(), clock)
    timer.loaded_until_ms = clock.now_ms()
    await hold_every_shard(timer, 1)
    store.failures = 3
    with caplog.at_level(logging.WARNING, logger="taskwheel.timer"):
        loading = asyncio.get_running_loop().create_task(timer._load_loop())
        await clock.advance(0)  # the loop runs its first read now
        await clock.advance(1_000)
        store.failures = 2
        await clock.run_until(lambda: not store.failures and len(store.read_at) > 8)
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    later = store.failed_at[3:]
    assert [at - later[0] for at in later] == [0, 50]
    assert [r.getMessage()[len("loading due tasks failed, retrying in "):] for r in caplog.records] == [
        "0.05s: store down", "0.10s: store down", "0.20s: store down", "0.05s: store down", "0.10s: store down"]


async def test_a_read_that_keeps_failing_is_retried_every_2s_at_most():
    clock = FakeClock()
    store = FlakyStore(clock)
    timer = TimerService(config(), store, RecordingDispatch(), clock)
    timer.loaded_until_ms = t0 = clock.now_ms()
    await hold_every_shard(timer, 1)
    store.failures = 1_000
    loading = asyncio.get_running_loop().create_task(timer._load_loop())
    await clock.advance(0)
    await clock.advance(10_000)
    loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    assert [at - t0 for at in store.failed_at] == [0, 50, 150, 350, 750, 1_550, 3_150, 5_150, 7_150, 9_150]


class FlakyDispatch:
    """Fails each hand-over while ``failures`` is above zero, and takes the next."""

    def __init__(self, clock: FakeClock, failures: int):
        self.clock = clock
        self.failures = failures
        self.handed_at: list[int] = []

    def hand_over(self, records, fired_at_ms):
        self.handed_at.append(self.clock.now_ms())
        handed = asyncio.get_running_loop().create_future()
        if self.failures:
            self.failures -= 1
            handed.set_exception(ConnectionError("dispatch down"))
        else:
            handed.set_result(None)
        return handed


async def test_a_failed_hand_over_is_retried_after_doubling_waits_up_to_2s_until_dispatch_takes_it(tmp_path, caplog):
    clock = FakeClock()
    dispatch = FlakyDispatch(clock, failures=8)
    timer = TimerService(config(), SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS), dispatch, clock)
    t0 = clock.now_ms()
    fired = [task("fired".ljust(28, "0"), t0 - 5)]
    with caplog.at_level(logging.WARNING, logger="taskwheel.timer"):
        timer._hand_over(fired, t0)
        await clock.advance(0)  # the first failure is seen, its retry waiting
        await clock.advance(7_000)
        unconfirmed_while_failing = dict(timer._unconfirmed)
        checkpoint_while_failing = timer.checkpoint(clock.now_ms())
        await clock.advance(1_000)
    assert [at - t0 for at in dispatch.handed_at] == [0, 50, 150, 350, 750, 1_550, 3_150, 5_150, 7_150]
    assert list(unconfirmed_while_failing.values()) == [(t0 - 5, 1)]
    assert checkpoint_while_failing <= t0 - 5
    assert (timer._unconfirmed, timer._unconfirmed_count) == ({}, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "handing over 1 fired tasks failed, retrying: dispatch down"] * 8


async def test_a_cancelled_hand_over_retry_stops_and_releases_its_batch(tmp_path):
    clock = FakeClock()
    dispatch = FlakyDispatch(clock, failures=1_000)
    timer = TimerService(config(), SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS), dispatch, clock)
    timer._hand_over([task("fired".ljust(28, "0"), clock.now_ms() - 5)], clock.now_ms())
    await clock.advance(0)
    await clock.advance(100)
    (retrying,) = timer._push_tasks
    retrying.cancel()
    await asyncio.gather(retrying, return_exceptions=True)
    await clock.advance(10_000)
    assert len(dispatch.handed_at) == 2
    assert (timer._unconfirmed, timer._unconfirmed_count) == ({}, 0)


async def test_a_task_no_offer_brought_into_the_loaded_window_fires_from_the_sweep(tmp_path):
    # Another node's ingest accepted it and died before offering it: the loader had read its
    # slice already, so only the sweep below the checkpoint finds it.
    from taskwheel.stores.base import Member
    from taskwheel.timer.servicer import SWEEP_EVERY_MS, SWEEP_LAG_MS

    store = SqliteStore(str(tmp_path / "t.db"), num_shards=SHARDS)
    await store.open()
    await store.heartbeat(Member("other", "127.0.0.1:2", frozenset({"ingest"}), frozenset(), 0, 2**62))
    clock = FakeClock(now_ms())
    dispatch = RecordingDispatch()
    cfg = config(checkpoint_margin_ms=1_000)
    timer = TimerService(cfg, store, dispatch, clock)
    await timer.start()
    owner = await joined(timer, store, clock, cfg)
    await until_loaded(timer, clock, clock.now_ms() + 1_000)
    lost = task("lost".ljust(28, "0"), clock.now_ms() + 500)
    await store.insert([lost])
    await clock.run_for(1_000)
    assert dispatch.fired == []  # due, but never loaded
    await clock.run_for(SWEEP_LAG_MS + SWEEP_EVERY_MS)
    await leave(owner, timer, clock)
    await store.close()
    assert [t for t, _, _ in dispatch.fired] == [lost.task_id]
    assert timer.swept == 1
