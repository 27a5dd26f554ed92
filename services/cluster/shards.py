"""A node's share of the shards: membership by heartbeat, ownership by fenced leases.

Every node that runs a timer runs one ShardOwner. Once a renewal interval (``shard_renew_ms``)
it makes a *round*:

1. **Heartbeat**: its members row (address, roles, the queues its workers consume) now lapses
   ``shard_lease_ms`` later.
2. **Renew** every shard it holds, in one conditional write per batch of shards that also saves
   each shard's checkpoint, conditional on this node still owning the shard at the epoch it
   acquired. A shard found taken over is *lost*: the timer drops it at once, without a
   checkpoint (the new owner's is the one that counts).
3. **Balance**, from a serial read of every lease and the live members: with N nodes running a
   timer, sorted by id, the i-th one's share is ``shards // N``, plus one for i below
   ``shards % N``. Under its share, a node acquires lapsed leases (released, or not renewed in
   time). Over its share, while some other node is under its own and no lapsed lease is left
   for it, the node **hands shards over**: the timer stops firing them and drains what it had
   handed to dispatch, the checkpoint is saved and the lease released in one conditional
   write, and the node under its share takes them at its next round, loading from that
   checkpoint.

Loading a shard taken (its catch-up from the checkpoint) and draining a shard handed over run
in the background: a round never waits for them, so the renewals go on however long they take
(with a 2 s lease, a round that waited for 128 shards' catch-up let every lease lapse). A shard
being handed over is still renewed, with its last saved checkpoint, until it is released.

Fencing. Firing a shard is allowed only until ``valid_until``: the time the last successful
renewal was *sent*, plus the lease, minus one renewal interval (others may take the shard once
the lease has run out by their clocks; the interval is the margin for clocks that disagree).
A node paused past that (a GC pause, SIGSTOP, a partition) stops firing the moment it runs
again, and its next renewal learns whether it still owns anything. Its checkpoint writes are
conditional on its epoch, so a stale owner can never move a checkpoint.

No coordination service: the store's conditional writes (Cassandra's lightweight transactions)
decide every race, and each acquisition raises the shard's epoch above every earlier one.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

from taskwheel.clock import SYSTEM_CLOCK, Clock
from taskwheel.config import Config
from taskwheel.stores.base import Member, ShardLease, Store

log = logging.getLogger("taskwheel.cluster")


class ShardHolder(Protocol):
    """What the ShardOwner needs of the timer."""

    def held_checkpoints(self, now_ms: int) -> dict[int, int]:
        """The checkpoint of each shard held, as it may be saved now."""

    async def take(self, leases: list[ShardLease], suspect_until: dict[int, int]) -> None:
        """Starts firing these shards, loading each from its checkpoint. A row of shard s due
        before suspect_until[s] may have been fired by the previous owner, which did not hand
        the shard over cleanly: its delivery is flagged as a possible repeat."""

    async def give_up(self, shards: set[int]) -> dict[int, int] | None:
        """Stops firing these shards, waits until what was fired of them is leased or held, and
        returns their checkpoints; None if that took too long (then they are not clean to
        hand over)."""

    def lose(self, shards: set[int]) -> None:
        """Stops firing these shards at once: another node owns them."""

    def fire_until(self, ms: int) -> None:
        """Shards held may fire only while the clock is below ``ms``."""

    sweeping: bool  # whether to read below the checkpoints for rows no offer brought


def new_node_id() -> str:
    return "node-" + uuid.uuid4().hex[:12]


def share_of(node_id: str, timers: list[str], shards: int) -> int:
    """The fair share of node_id among the sorted ids of the nodes that run a timer."""
    if node_id not in timers:
        return 0
    i = timers.index(node_id)
    return shards // len(timers) + (1 if i < shards % len(timers) else 0)


def _rank(node_id: str, shard: int) -> bytes:
    # Each node prefers shards in its own order, so nodes acquiring at once rarely collide.
    return hashlib.blake2b(f"{node_id}/{shard}".encode(), digest_size=8).digest()


@dataclass(slots=True)
class View:
    """What this node last read of the cluster: who is alive and who owns each shard."""

    members: dict[str, Member] = field(default_factory=dict)
    owners: list[str] = field(default_factory=list)  # per shard: the owner's node id, "" if none


class ShardOwner:
    """This node in the cluster: its heartbeat, the leases it holds, its view of the others."""

    def __init__(self, config: Config, store: Store, node_id: str, address: str, roles: frozenset[str],
                 timer: ShardHolder | None, queues: Callable[[], frozenset[str]] = frozenset,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.node_id = node_id
        self.address = address
        self.roles = roles
        self._config = config
        self._store = store
        self._timer = timer
        self._queues = queues
        self._clock = clock
        self._started_ms = clock.now_ms()
        self.held: dict[int, ShardLease] = {}  # as acquired; checkpoint_ms as last saved
        self.view = View()
        self._view_changed: list[Callable[[View], None]] = []
        self._task: asyncio.Task | None = None
        self._round_lock = asyncio.Lock()
        self._handing: set[int] = set()  # held, being drained before their release
        self._takes: set[asyncio.Task] = set()  # loading shards taken
        self._handoffs: set[asyncio.Task] = set()  # draining shards handed over
        self.handed_over = 0
        self.lost = 0

    def on_view(self, callback: Callable[[View], None]) -> None:
        self._view_changed.append(callback)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Joins: the first round runs before this returns, so a lone node fires at once."""
        await self.round()
        await asyncio.sleep(0)  # the takes of that round begin: the timer holds their shards
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cluster-rounds")

    async def stop(self) -> None:
        """Hands every shard over (saving its checkpoint) and leaves."""
        # Handoffs under way finish (their shards are out of the timer already, with the
        # checkpoints only they know); takes under way stop, and their shards lapse.
        running = [t for t in (self._task,) if t is not None] + list(self._takes)
        for task in running:
            task.cancel()
        for task in running + list(self._handoffs):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._task = None
        async with self._round_lock:
            try:
                if self.held:
                    shards = set(self.held)
                    await self._release(shards, await self._timer.give_up(shards) if self._timer else None)
                await self._store.leave(self.node_id)
            except Exception as exc:  # the leases lapse on their own
                log.warning("leaving the cluster: %s", exc)

    async def _loop(self) -> None:
        interval = self._config.shard_renew_ms / 1000
        while True:
            await self._clock.sleep(interval if self._settled() else interval / 4)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster round failed: %s", exc)

    def _settled(self) -> bool:
        """False while this node is under its share and shards are moving: it looks again
        sooner, so a handed-over shard waits less for its new owner."""
        return self._timer is None or len(self.held) - len(self._handing) >= share_of(
            self.node_id, self._timers(self.view.members), self._store.num_shards)

    def _timers(self, members: dict[str, Member]) -> list[str]:
        """The sorted ids of the nodes that run a timer, this one included."""
        return sorted({m.node_id for m in members.values() if "timer" in m.roles} | {self.node_id})

    # -- one round ------------------------------------------------------------------------------

    async def round(self) -> None:
        async with self._round_lock:
            await self._round()

    async def _round(self) -> None:
        config = self._config
        sent = self._clock.now_ms()
        await self._store.heartbeat(Member(self.node_id, self.address, self.roles, self._queues(),
                                           self._started_ms, sent + config.shard_lease_ms))
        if self.held:
            await self._renew(sent)
        members = {m.node_id: m for m in await self._store.members(self._clock.now_ms())}
        leases = await self._store.shard_leases()
        now = self._clock.now_ms()
        self.view = View(members, [lease.owner if not lease.lapsed(now) else "" for lease in leases])
        for callback in self._view_changed:
            callback(self.view)
        if self._timer is not None:
            # Alone, every task reaches this timer by an offer in process or by its loader; with
            # other members, one may accept a task and die before offering it.
            self._timer.sweeping = any(node != self.node_id for node in members)
        if self._timer is not None:
            await self._balance(leases, members, now)

    async def _renew(self, sent: int) -> None:
        assert self._timer is not None
        checkpoints = self._timer.held_checkpoints(sent)
        held = {}
        for shard, lease in self.held.items():
            # Never lower a saved checkpoint: a shard taken recently may still be loading below it.
            held[shard] = (lease.epoch, max(lease.checkpoint_ms, checkpoints.get(shard, lease.checkpoint_ms)))
        expires = sent + self._config.shard_lease_ms
        lost = await self._store.renew_shards(self.node_id, held, expires)
        for shard, (epoch, checkpoint) in held.items():
            if shard not in lost:
                self.held[shard] = ShardLease(shard, self.node_id, epoch, expires, checkpoint)
        if lost:
            log.warning("lost %d shards to other nodes: %s", len(lost), sorted(lost))
            self._drop(lost)
        self._timer.fire_until(self._valid_until(sent))

    def _valid_until(self, sent: int) -> int:
        return sent + self._config.shard_lease_ms - self._config.shard_renew_ms

    def _drop(self, shards: set[int]) -> None:
        assert self._timer is not None
        for shard in shards:
            self.held.pop(shard, None)
        self.lost += len(shards)
        self._timer.lose(shards)

    async def _balance(self, leases: list[ShardLease], members: dict[str, Member], now: int) -> None:
        timers = self._timers(members)
        shards = len(leases)
        share = share_of(self.node_id, timers, shards)
        # Shards nobody holds: released, never owned, lapsed, or ours from an earlier life.
        free = [lease for lease in leases if lease.shard not in self.held
                and (lease.lapsed(now) or lease.owner == self.node_id)]
        kept = len(self.held) - len(self._handing)
        if kept < share and free:
            free.sort(key=lambda lease: _rank(self.node_id, lease.shard))
            await self._acquire(free[:share - kept])
        elif kept > share:
            owned: dict[str, int] = {}
            for lease in leases:
                if not lease.lapsed(now):
                    owned[lease.owner] = owned.get(lease.owner, 0) + 1
            wanted = sum(max(0, share_of(node, timers, shards) - owned.get(node, 0))
                         for node in timers if node != self.node_id)
            extra = min(kept - share, wanted - len(free))
            if extra > 0:
                mine = sorted(set(self.held) - self._handing, key=lambda shard: _rank(self.node_id, shard),
                              reverse=True)
                self._hand_over(set(mine[:extra]))

    async def _acquire(self, free: list[ShardLease]) -> None:
        assert self._timer is not None
        sent = self._clock.now_ms()
        taken = await self._store.acquire_shards(self.node_id, free, sent + self._config.shard_lease_ms)
        if not taken:
            return
        before = {lease.shard: lease for lease in free}
        suspect = {}
        for lease in taken:
            previous = before[lease.shard]
            if previous.owner:
                # Not released: its owner crashed, or stopped answering, or is this node's earlier
                # life. It fired rows only while its clock was a renewal interval short of its
                # lease's end (an earlier life of this node: up to now, at the most).
                stopped = previous.expires_ms - self._config.shard_renew_ms
                suspect[lease.shard] = min(sent, stopped) if previous.owner != self.node_id else sent
        for lease in taken:
            self.held[lease.shard] = lease
        if len(self.held) == len(taken):
            # The first shards held: until now there was nothing to fire. Shards taken later
            # are valid at least as long as the ones held already.
            self._timer.fire_until(self._valid_until(sent))
        # shard@epoch, and <ms: rows due before it may have fired under the previous owner
        log.info("took %d shards (%d now)%s: %s", len(taken), len(self.held),
                 f", {len(suspect)} from owners that did not hand them over" if suspect else "",
                 " ".join(f"{lease.shard}@{lease.epoch}"
                          + (f"<{suspect[lease.shard]}" if lease.shard in suspect else "") for lease in taken))
        self._background(self._take(taken, suspect), "cluster-take", self._takes)

    async def _take(self, taken: list[ShardLease], suspect: dict[int, int]) -> None:
        assert self._timer is not None
        try:
            await self._timer.take(taken, suspect)
        except BaseException as exc:  # cancelled too
            # Not loaded: released now, they would skip what lies between their checkpoints
            # and the load's progress. Unrenewed, they lapse with the checkpoints they had.
            for lease in taken:
                if self.held.get(lease.shard) is lease:
                    del self.held[lease.shard]
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("loading %d shards taken failed, left to lapse: %s", len(taken), exc)

    def _hand_over(self, shards: set[int]) -> None:
        """Drains the shards in the background, then releases them (under the round lock)."""
        assert self._timer is not None
        self._handing |= shards

        async def drain_and_release() -> None:
            try:
                checkpoints = await self._timer.give_up(shards)
                async with self._round_lock:
                    await self._release(shards, checkpoints)
            finally:
                self._handing -= shards

        self._background(drain_and_release(), "cluster-handoff", self._handoffs)

    def _background(self, coro, name: str, tasks: set[asyncio.Task]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _release(self, shards: set[int], checkpoints: dict[int, int] | None) -> None:
        """Releases the drained shards still held, each with its checkpoint; None: not drained."""
        shards = {shard for shard in shards if shard in self.held}
        if checkpoints is None:
            # Not drained: released now, the next owner would take them as if handed over
            # cleanly and fire again, unflagged, what this node delivered without a durable
            # lease. Unrenewed, they lapse, and it takes them as from a node that died.
            for shard in shards:
                del self.held[shard]
            log.warning("%d shards not drained in time: left to lapse instead of handed over", len(shards))
            return
        held = {shard: (self.held[shard].epoch, max(self.held[shard].checkpoint_ms, checkpoints[shard]))
                for shard in shards}
        for shard in shards:
            del self.held[shard]
        released = await self._store.release_shards(self.node_id, held)
        self.handed_over += len(released)
        log.info("handed %d shards over (%d now): %s", len(released), len(self.held),
                 " ".join(f"{shard}@{held[shard][0]}:{held[shard][1]}" for shard in sorted(released)))
