"""Nodes sharing the shards of one store: fair shares, handoffs, crashes and stale owners.

Every node here is a real TimerService and ShardOwner on one embedded store and one fake clock
(taskwheel.clock.FakeClock), each handing what it fires to its own recording dispatch: what a
test sees is what the nodes did, whatever the machine's load."""
import asyncio
import time

import pytest

from taskwheel.clock import FakeClock
from taskwheel.cluster.shards import ShardOwner, share_of
from taskwheel.config import Config
from taskwheel.core import shard_of
from taskwheel.stores.sqlite import SqliteStore
from taskwheel.task import TaskRecord
from taskwheel.timer import TimerService

SHARDS = 16


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def config() -> Config:
    return Config(lookahead_ms=2_000, slice_ms=500, shard_renew_ms=200, shard_lease_ms=1_000,
                  checkpoint_margin_ms=0, shards=SHARDS)


class RecordingDispatch:
    """Confirms at once without writing leases: a row fired stays live, as if the node died
    before its lease was written."""

    def __init__(self):
        self.fired: list[tuple[str, int, int]] = []
        self.firings: list[tuple[str, bool, int]] = []  # task id, redelivered, owner epoch
        self.confirming = True  # False: never confirms, as a dispatch whose lease writes hang

    def hand_over(self, records, fired_at_ms):
        self.fired.extend((r.task_id, r.due_ms, fired_at_ms) for r in records)
        self.firings.extend((r.task_id, r.redelivered, r.owner_epoch) for r in records)
        done = asyncio.get_running_loop().create_future()
        if self.confirming:
            done.set_result(None)
        return done


class Node:
    def __init__(self, node_id: str, store, clock: FakeClock):
        self.node_id = node_id
        self.dispatch = RecordingDispatch()
        self.timer = TimerService(config(), store, self.dispatch, clock)
        self.owner = ShardOwner(config(), store, node_id, f"{node_id}:1", frozenset({"timer"}), self.timer,
                                clock=clock)

    async def start(self):
        await self.timer.start()
        await self.owner.start()

    async def crash(self):
        """Stops everything without a word: no handoff, no release, leases left to lapse."""
        self.owner._task.cancel()
        await asyncio.gather(self.owner._task, return_exceptions=True)
        await self.timer.stop()

    def pause(self):
        """Stops renewing (a process stopped, or cut off from the store); its timer stays."""
        self.owner._task.cancel()


@pytest.fixture
async def cluster(tmp_path):
    store = SqliteStore(str(tmp_path / "tasks.db"), num_shards=SHARDS)
    await store.open()
    clock = FakeClock(now_ms())
    nodes: list[Node] = []

    async def node(node_id: str) -> Node:
        n = Node(node_id, store, clock)
        await n.start()
        nodes.append(n)
        return n

    yield store, clock, node
    for n in nodes:
        if n.owner._task is not None and not n.owner._task.done():
            stopping = asyncio.ensure_future(n.owner.stop())
            await clock.run_until(stopping.done, real_timeout_s=30)
        await n.timer.stop()
    await store.close()


def tasks(start_ms: int, count: int, every_ms: int) -> list[TaskRecord]:
    ids = [f"{start_ms:013d}{i:015d}" for i in range(count)]
    return [TaskRecord(task_id=t, shard=shard_of(t, SHARDS), queue="q", payload=b"", fire_at_ms=start_ms + i * every_ms,
                       due_ms=start_ms + i * every_ms, created_ms=start_ms) for i, t in enumerate(ids)]


async def submit(store, work: list[TaskRecord], *nodes: Node) -> None:
    """As ingest does: durable first, then offered to the timers (each keeps its own shards)."""
    await store.insert(work)
    for n in nodes:
        n.timer.offer(work)


def fired(*nodes: Node) -> list[str]:
    return sorted(t for n in nodes for t, _, _ in n.dispatch.fired)


async def owners(store) -> list[str]:
    return [lease.owner for lease in await store.shard_leases()]


def test_each_node_gets_its_share_within_one_shard():
    for n in range(1, 9):
        nodes = [f"n{i}" for i in range(n)]
        shares = [share_of(node, nodes, 256) for node in nodes]
        assert sum(shares) == 256 and max(shares) - min(shares) <= 1
    assert share_of("stranger", ["a", "b"], 16) == 0


async def test_a_lone_node_takes_every_shard_at_start(cluster):
    store, clock, node = cluster
    a = await node("a")
    assert a.timer.shards == frozenset(range(SHARDS))
    leases = await store.shard_leases()
    assert {(lease.owner, lease.epoch) for lease in leases} == {("a", 1)}


async def test_a_joining_node_gets_its_share_by_handoff_with_nothing_fired_twice(cluster):
    store, clock, node = cluster
    a = await node("a")
    start = clock.now_ms() + 500
    work = tasks(start, 600, 5)  # one due every 5 ms for 3 s, across every shard
    await submit(store, work, a)
    await clock.run_for(300)
    b = await node("b")
    await clock.run_until(lambda: len(b.timer.shards) == SHARDS // 2, limit_ms=10_000)
    joined_at = clock.now_ms()
    assert len(a.timer.shards) == SHARDS // 2 and not a.timer.shards & b.timer.shards
    await clock.run_for(4_000)
    assert fired(a, b) == sorted(t.task_id for t in work)  # each exactly once
    assert all(f >= due for n in (a, b) for _, due, f in n.dispatch.fired)  # never early
    assert b.dispatch.fired and joined_at - start < 3_000  # b fired some of them
    assert sorted(await owners(store)) == ["a"] * 8 + ["b"] * 8
    assert a.owner.handed_over == SHARDS // 2
    assert not any(redelivered for n in (a, b) for _, redelivered, _ in n.dispatch.firings)
    assert {epoch for _, _, epoch in b.dispatch.firings} == {2}  # a's first epoch was 1


async def test_a_node_that_stops_hands_every_shard_to_the_others(cluster):
    store, clock, node = cluster
    a, b = await node("a"), await node("b")
    await clock.run_until(lambda: len(b.timer.shards) == SHARDS // 2, limit_ms=10_000)
    work = tasks(clock.now_ms() + 1_000, 200, 10)
    await submit(store, work, a, b)
    stopping = asyncio.ensure_future(b.owner.stop())
    await clock.run_until(stopping.done)
    await b.timer.stop()
    await clock.run_until(lambda: len(a.timer.shards) == SHARDS, limit_ms=5_000)
    await clock.run_for(3_500)
    assert fired(a, b) == sorted(t.task_id for t in work)
    assert set(await owners(store)) == {"a"}
    assert await store.members(clock.now_ms()) == [m for m in await store.members(clock.now_ms()) if m.node_id == "a"]


async def test_the_shards_of_a_crashed_node_are_taken_once_its_leases_lapse(cluster):
    store, clock, node = cluster
    a, b = await node("a"), await node("b")
    await clock.run_until(lambda: len(b.timer.shards) == SHARDS // 2, limit_ms=10_000)
    work = tasks(clock.now_ms() + 300, 300, 10)
    b.dispatch.confirming = False  # what b fires is never leased: it dies first
    await submit(store, work, a, b)
    await clock.run_for(1_000)
    b_held = set(b.timer.shards)
    await b.crash()
    crashed_at = clock.now_ms()
    await clock.run_until(lambda: len(a.timer.shards) == SHARDS, limit_ms=10_000)
    failover_ms = clock.now_ms() - crashed_at
    assert failover_ms <= config().shard_lease_ms + 2 * config().shard_renew_ms
    await clock.run_for(4_000)
    assert set(fired(a, b)) == {t.task_id for t in work}  # nothing lost
    # a took b's shards from a lapsed lease, each at an epoch above b's (2): a's third
    leases = await store.shard_leases()
    assert {(leases[s].owner, leases[s].epoch) for s in b_held} == {("a", 3)}
    # What b fired (its leases never written here) a fires again, flagged and at a higher
    # epoch; nothing else is flagged.
    by_b = {t for t, _, _ in b.dispatch.firings}
    again = [(t, redelivered, epoch) for t, redelivered, epoch in a.dispatch.firings if t in by_b]
    assert by_b and len(again) == len(by_b)
    assert {(redelivered, epoch) for _, redelivered, epoch in again} == {(True, 3)}
    assert not any(redelivered for _, redelivered, _ in b.dispatch.firings)
    # A row b never fired is flagged only if b could have: due before b would have stopped
    # firing by itself (its last renewal's lease, less one renewal interval).
    due = {t.task_id: t.due_ms for t in work}
    could_until = crashed_at + config().shard_lease_ms - config().shard_renew_ms
    assert all(due[t] < could_until for t, redelivered, _ in a.dispatch.firings if redelivered and t not in by_b)


async def test_a_paused_node_stops_firing_before_its_leases_lapse_and_never_moves_a_checkpoint(cluster):
    store, clock, node = cluster
    a, b = await node("a"), await node("b")
    await clock.run_until(lambda: len(b.timer.shards) == SHARDS // 2, limit_ms=10_000)
    b_held = set(b.timer.shards)
    paused_at = clock.now_ms()
    b.pause()
    work = tasks(paused_at + 1_500, 200, 10)  # due after b's leases stop it, before they lapse for a
    await submit(store, work, a, b)
    await clock.run_until(lambda: len(a.timer.shards) == SHARDS, limit_ms=10_000)
    checkpoints = {lease.shard: lease.checkpoint_ms for lease in await store.shard_leases()}
    await clock.run_for(3_500)
    stopped_by = paused_at + config().shard_lease_ms - config().shard_renew_ms
    assert all(f < stopped_by for _, _, f in b.dispatch.fired)
    assert fired(a, b) == sorted(t.task_id for t in work)
    # b wakes: its renewal is refused for every shard, so it drops them, checkpoints untouched.
    await b.owner.round()
    assert b.timer.shards == frozenset() and b.owner.lost == len(b_held)
    after = {lease.shard: lease.checkpoint_ms for lease in await store.shard_leases()}
    assert all(after[s] >= checkpoints[s] for s in b_held)
    assert {lease.owner for lease in await store.shard_leases()} == {"a"}


async def test_a_restarted_node_with_its_old_id_takes_its_shards_back_at_once(cluster):
    store, clock, node = cluster
    a = await node("a")
    await a.crash()
    again = await node("a")  # same id, new life: its earlier leases are taken without waiting
    assert again.timer.shards == frozenset(range(SHARDS))
    assert {lease.epoch for lease in await store.shard_leases()} == {2}
    # the earlier life cannot renew them
    assert await store.renew_shards("a", {0: (1, 0)}, clock.now_ms() + 1_000) == {0}
