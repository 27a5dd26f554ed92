"""Several taskwheel nodes on one Cassandra keyspace: one cluster, with no flag but the store.

Real `taskwheel up` processes on loopback ports, a real Cassandra, a steady load submitted
through the nodes and workers on plain gRPC streams. Each test counts every delivery of every
accepted task: none lost, none early, and none twice unless a fault can explain it."""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import time
import uuid

import grpc
import pytest

from taskwheel.core import shard_of
from taskwheel.internal.v1 import timer_pb2, timer_pb2_grpc
from taskwheel.timer.servicer import SWEEP_EVERY_MS, SWEEP_LAG_MS
from taskwheel.v1 import ingest_pb2
from tests.e2e.harness import Load, QueueWorker, ServerProcess, free_port, ingest, now_ms, spec

pytestmark = [pytest.mark.slow, pytest.mark.cassandra]

SHARDS = 32
LEASE_MS = 5_000  # the shard leases' default lapse
TASK_LEASE_MS = 2_000  # a delivery's lease: an unacked task comes back this soon


class Node:
    """One `taskwheel up` on the shared keyspace; restarts on the same port, as a new node."""

    def __init__(self, store: str, directory, name: str):
        self.name = name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        os.makedirs(directory / name, exist_ok=True)
        self.process = ServerProcess(
            ["up", "--store", store, "--listen", self.target, "--data-dir", str(directory / name)],
            str(directory / f"{name}.log"))

    def start(self) -> "Node":
        self.process.start(timeout=60)
        return self

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()

    def signal(self, sig) -> None:
        self.process.proc.send_signal(sig)

    def shards(self) -> int:
        """Shards its timer holds now; -1 when it does not answer."""
        try:
            with grpc.insecure_channel(self.target) as channel:
                status = timer_pb2_grpc.TimerStub(channel).Status(timer_pb2.TimerStatusRequest(), timeout=2)
            return status.shards
        except grpc.RpcError:
            return -1


@pytest.fixture
def keyspace_url(cassandra_contact):
    host, port = cassandra_contact
    return f"cassandra://{host}:{port}/cluster_{uuid.uuid4().hex[:10]}?shards={SHARDS}"


def node_starter(store: str, directory):
    """start(count) starts that many more nodes on the store; ``made`` lists them all."""
    made: list[Node] = []

    def start(count: int) -> list[Node]:
        new = [Node(store, directory, f"node{len(made) + i}") for i in range(count)]
        for node in new:
            node.start()
            made.append(node)
        return new

    return start, made


@pytest.fixture
def nodes(keyspace_url, tmp_path):
    start, made = node_starter(keyspace_url, tmp_path)
    yield start
    for node in made:
        try:
            node.signal(signal.SIGCONT)
        except Exception:
            pass
        node.stop()


def wait_until(condition, timeout: float, every: float = 0.2) -> float:
    """Seconds it took for condition() to hold; AssertionError past timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - started


def balanced(live: list[Node]) -> bool:
    held = [node.shards() for node in live]
    return sum(held) == SHARDS and max(held) - min(held) <= 1


def deliveries(workers: list[QueueWorker], key=lambda r: r.task_id) -> dict:
    """Every delivery so far, grouped by ``key`` (the task id unless told)."""
    got = collections.defaultdict(list)
    for worker in workers:
        for r in worker.snapshot():
            got[key(r)].append(r)
    return got


def wait_delivered(workers: list[QueueWorker], accepted, timeout: float,
                   key=lambda r: r.task_id) -> dict:
    """Every delivery once all accepted tasks (keys of ``key``) have one, or after ``timeout``
    s (the caller's assertions then say what is missing)."""
    try:
        wait_until(lambda: set(accepted) <= set(deliveries(workers, key)), timeout, every=0.5)
    except AssertionError:
        return deliveries(workers, key)
    time.sleep(1.0)  # a duplicate, or a refused task, would arrive now
    return deliveries(workers, key)


def missing(keyspace_url: str, got: dict, accepted: dict[str, int]) -> str:
    """What the store says of the accepted tasks never delivered, for an assertion's message."""
    from cassandra.cluster import Cluster

    lost = sorted(set(accepted) - set(got))
    if not lost:
        return "none missing"
    host_port, keyspace = keyspace_url.split("://")[1].split("?")[0].split("/")
    host, port = host_port.split(":")
    cluster = Cluster([host], port=int(port))
    try:
        session = cluster.connect(keyspace)
        rows = [session.execute("SELECT task_id, shard, state, gen, attempt, due_ms FROM tasks WHERE task_id = %s",
                                (t,)).one() for t in lost[:10]]
        leases = {r.shard: (r.owner, r.epoch, r.checkpoint_ms) for r in session.execute(
            "SELECT shard, owner, epoch, checkpoint_ms FROM shard_leases WHERE p = 0")}
    finally:
        cluster.shutdown()
    now = now_ms()
    return (f"{len(lost)} of {len(accepted)} never delivered; first ones (due - now ms): "
            + "; ".join(f"{r.task_id} shard {r.shard} state {r.state} gen {r.gen} attempt {r.attempt} "
                        f"due {r.due_ms - now} lease {leases.get(r.shard)}" if r else "no row" for r in rows))


def test_three_nodes_share_the_shards_and_deliver_each_task_once_to_a_worker_on_another_node(nodes):
    a, b, c = nodes(3)
    wait_until(lambda: balanced([a, b, c]), timeout=15)
    with QueueWorker(c.target, "spread") as worker, Load([a.target], "spread", rate=800) as load:
        time.sleep(6)
        load.stop()
        got = wait_delivered([worker], load.accepted, timeout=30)
    assert len(load.accepted) >= 1_500 and load.failed == 0
    assert set(got) == set(load.accepted)  # every task, from every shard, through node c
    assert [t for t, rs in got.items() if len(rs) > 1] == []
    assert all(r.received_ms >= load.accepted[t] for t, rs in got.items() for r in rs)
    assert not any(r.redelivered for rs in got.values() for r in rs)  # no fault, no flag
    assert all(r.owner_epoch > 0 for rs in got.values() for r in rs)


def test_with_a_worker_on_every_node_each_task_is_still_delivered_once(nodes):
    live = nodes(3)
    wait_until(lambda: balanced(live), timeout=15)
    workers = [QueueWorker(node.target, "everywhere").__enter__() for node in live]
    try:
        with Load([node.target for node in live], "everywhere", rate=800) as load:
            time.sleep(6)
        got = wait_delivered(workers, load.accepted, timeout=30)
    finally:
        for worker in workers:
            worker.__exit__(None, None, None)
    assert set(got) == set(load.accepted)
    assert [t for t, rs in got.items() if len(rs) > 1] == []
    assert all(worker.snapshot() for worker in workers)  # each node delivered its own share


def test_a_worker_connecting_late_to_one_node_gets_what_every_node_fired_meanwhile(nodes):
    a, b, c = nodes(3)
    wait_until(lambda: balanced([a, b, c]), timeout=15)
    due = now_ms() + 500
    results = ingest(a.target).Submit(ingest_pb2.SubmitRequest(
        tasks=[spec("late", fire_at_ms=due + i) for i in range(300)]), timeout=30).results
    time.sleep(4)  # fired on every node, no worker anywhere: each waits, held, where it fired
    with QueueWorker(c.target, "late") as worker:
        # Not at the held rows' due time (30 s): the nodes push them to c once c has a worker.
        took = wait_until(lambda: len({r.task_id for r in worker.snapshot()}) == 300, timeout=10)
        time.sleep(1)
        got = worker.snapshot()
    assert sorted(r.task_id for r in got) == sorted(r.task_id for r in results)
    assert took < 10


def test_a_joining_node_gets_its_share_within_10s_with_nothing_lost_or_repeated(nodes):
    a, b = nodes(2)
    wait_until(lambda: balanced([a, b]), timeout=15)
    with QueueWorker(a.target, "join") as worker, Load([a.target, b.target], "join", rate=800) as load:
        time.sleep(2)
        (c,) = nodes(1)
        took = wait_until(lambda: balanced([a, b, c]), timeout=10)
        time.sleep(3)
        load.stop()
        got = wait_delivered([worker], load.accepted, timeout=30)
    assert took <= 10
    assert set(got) == set(load.accepted)
    assert [t for t, rs in got.items() if len(rs) > 1] == []  # a handoff fires nothing twice


@dataclasses.dataclass
class Kills:
    accepted: dict[str, int]
    got: dict[str, list]
    failovers: list[float]
    keyspace_url: str


@pytest.fixture(scope="module")
def ten_kills(cassandra_contact, tmp_path_factory) -> Kills:
    """Three nodes under load; ten times, one of them (each in turn, at varying moments) is
    killed with SIGKILL, the survivors take its shards, and it starts again (a new node on the
    same port) with a new worker. Run once for the tests below."""
    host, port = cassandra_contact
    url = f"cassandra://{host}:{port}/cluster_{uuid.uuid4().hex[:10]}?shards={SHARDS}"
    directory = tmp_path_factory.mktemp("kills")
    live = [Node(url, directory, f"node{i}").start() for i in range(3)]
    workers: dict[str, QueueWorker] = {}
    retired: list[QueueWorker] = []
    failovers = []
    try:
        wait_until(lambda: balanced(live), timeout=15)
        workers = {node.name: QueueWorker(node.target, "kills").__enter__() for node in live}
        with Load([node.target for node in live], "kills", rate=300) as load:
            for kill in range(10):
                time.sleep(0.5 + (kill % 3) * 0.4)
                victim = live[kill % 3]
                victim.kill()
                retired.append(workers.pop(victim.name))
                survivors = [node for node in live if node is not victim]
                failovers.append(wait_until(lambda: sum(max(0, n.shards()) for n in survivors) == SHARDS,
                                            timeout=15))
                victim.start()
                workers[victim.name] = QueueWorker(victim.target, "kills").__enter__()
                wait_until(lambda: balanced(live), timeout=15)
        got = wait_delivered(list(workers.values()) + retired, load.accepted, timeout=60)
    finally:
        for worker in list(workers.values()) + retired:
            worker.__exit__(None, None, None)
        for node in live:
            node.stop()
    repeats = sum(1 for rs in got.values() if len(rs) > 1)
    print(f"kills: {len(load.accepted)} accepted, {repeats} delivered more than once, failovers {failovers} s")
    return Kills(load.accepted, got, failovers, url)


def test_ten_kills_of_nodes_under_load_lose_nothing_and_the_survivors_take_the_shards_within_10s(ten_kills):
    accepted, got, failovers = ten_kills.accepted, ten_kills.got, ten_kills.failovers
    assert len(accepted) > 1_000
    assert set(accepted) <= set(got), missing(ten_kills.keyspace_url, got, accepted)  # every accepted task
    assert max(failovers) <= 10, failovers
    # None later than the failover plus the longer of a delivery's lease + the lookahead (a
    # delivery lost with a killed node) and the sweep's lag + period (an offer lost with a
    # killed node, found below its shard's checkpoint: docs/design.md, "The cluster"), plus
    # the 2 s of lateness a loaded 2-core machine adds to everything.
    slowest_path_ms = max(TASK_LEASE_MS + 5_000, SWEEP_LAG_MS + SWEEP_EVERY_MS)
    bound_ms = slowest_path_ms + max(failovers) * 1000 + 2_000
    late = [min(r.received_ms for r in got[t]) - due for t, due in accepted.items()]
    assert max(late) <= bound_ms, (max(late), bound_ms)


@pytest.mark.xfail(strict=True, reason=(
    "known gap (issue 23): under repeated kills about 2 % of the tasks were delivered again "
    "with attempt 1 and no flag, the source not found yet"))
def test_ten_kills_flag_every_repeat_a_worker_sees(ten_kills):
    got = ten_kills.got
    # Each delivery after a task's first says it may be a repeat (the first one may say so too,
    # when it fell in a killed node's window).
    unflagged = [t for t, rs in got.items()
                 if any(not r.redelivered for r in sorted(rs, key=lambda r: r.received_ms)[1:])]
    assert unflagged == [], [(t, shard_of(t, SHARDS), ten_kills.accepted.get(t),
                              [(r.delivery_id, r.attempt, r.redelivered, r.owner_epoch, r.received_ms)
                               for r in got[t]]) for t in unflagged[:3]]


def test_a_node_stopped_past_its_lease_stops_firing_when_it_wakes_and_loses_nothing(nodes):
    a, b, c = nodes(3)
    wait_until(lambda: balanced([a, b, c]), timeout=15)
    with QueueWorker(a.target, "pause") as worker, Load([a.target], "pause", rate=500) as load:
        time.sleep(2)
        c.signal(signal.SIGSTOP)
        wait_until(lambda: a.shards() + b.shards() == SHARDS, timeout=15)
        time.sleep(1)
        c.signal(signal.SIGCONT)
        # Within one renewal of waking it learns it holds nothing.
        wait_until(lambda: c.shards() in (0, -1) or balanced([a, b, c]), timeout=5)
        time.sleep(3)
        load.stop()
        got = wait_delivered([worker], load.accepted, timeout=30)
    assert set(got) == set(load.accepted)
    repeats = [t for t, rs in got.items() if len(rs) > 1]
    # The documented bound (docs/design.md, "The cluster"): only tasks c had fired but whose
    # lease write was not durable when it stopped, a few ms of fires.
    assert len(repeats) <= 500 // 10, len(repeats)
