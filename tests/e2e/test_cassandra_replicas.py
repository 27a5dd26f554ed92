"""taskwheel on three Cassandra nodes (replication factor 3) while Cassandra nodes die and return.

Real processes: the dev launcher's three JVMs on 127.0.0.1-3, `taskwheel up` nodes, a steady
load submitted over gRPC and workers on plain Consume streams. Every submitted task carries a
unique payload, so a task whose Submit was refused is recognised if it is ever delivered."""
from __future__ import annotations

import collections
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy
from cassandra.query import SimpleStatement

from taskwheel.v1 import ingest_pb2
from tests.e2e.harness import QueueWorker, now_ms, spec
from tests.e2e.test_cluster import SHARDS, Node, balanced, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cassandra]

NOTHING_STORED = "none of these tasks will run"


@dataclass
class Outcomes:
    accepted: dict[bytes, tuple[str, int]] = field(default_factory=dict)  # payload -> (id, fire_at)
    refused: dict[bytes, str] = field(default_factory=dict)  # payload -> status details
    maybe: dict[bytes, str] = field(default_factory=dict)  # refused, but possibly stored
    retry_after_ms: list[int] = field(default_factory=list)
    codes: collections.Counter = field(default_factory=collections.Counter)


class Load:
    """Submits ``rate`` tasks/s in batches every 100 ms, each due 1-2 s later, and sorts every
    task by its Submit's answer."""

    def __init__(self, target: str, queue: str, rate: int):
        self.queue = queue
        self.per_batch = max(1, rate // 10)
        self.out = Outcomes()
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(target)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()

    def accepted_since(self, count: int) -> int:
        return len(self.out.accepted) - count

    def _run(self) -> None:
        from taskwheel.v1 import ingest_pb2_grpc

        stub = ingest_pb2_grpc.IngestStub(self._channel)
        while not self._stop.is_set():
            started = time.monotonic()
            now = now_ms()
            specs = [spec(self.queue, payload=b"%s-%d" % (self.queue.encode(), next(self._seq)),
                          fire_at_ms=now + 1_000 + (i * 1_000) // self.per_batch,
                          lease={"seconds": 5})
                     for i in range(self.per_batch)]
            try:
                results = stub.Submit(ingest_pb2.SubmitRequest(tasks=specs), timeout=10).results
                for s, r in zip(specs, results):
                    self.out.accepted[s.payload] = (r.task_id, s.fire_at.seconds * 1000 + s.fire_at.nanos // 1_000_000)
                self.out.codes["OK"] += 1
            except grpc.RpcError as e:
                self.out.codes[e.code().name] += 1
                kind = self.out.refused if NOTHING_STORED in (e.details() or "") else self.out.maybe
                for s in specs:
                    kind[s.payload] = e.details() or ""
                for key, value in e.trailing_metadata() or ():
                    if key == "retry-after-ms":
                        self.out.retry_after_ms.append(int(value))
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))


def delivered(worker: QueueWorker) -> dict[bytes, list]:
    got = collections.defaultdict(list)
    for r in worker.snapshot():
        got[r.payload].append(r)
    return got


def wait_delivered(worker: QueueWorker, payloads, timeout: float) -> dict[bytes, list]:
    try:
        wait_until(lambda: set(payloads) <= set(delivered(worker)), timeout, every=0.5)
        time.sleep(1.0)  # a duplicate or a refused task would show up now
    except AssertionError:
        pass  # the caller's assertions say what is missing
    return delivered(worker)


def session_on(cluster, *hosts: str):
    """A driver session whose requests go only to the given nodes."""
    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy(list(hosts)))
    c = Cluster(list(hosts), port=cluster.port, protocol_version=5,
                execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    return c, c.connect()


def pending_hints(cluster, host: str) -> int:
    """Hints the node holds for its peers (system_views is each node's own)."""
    c, session = session_on(cluster, host)
    try:
        return sum(r.files for r in session.execute("SELECT files FROM system_views.pending_hints"))
    finally:
        c.shutdown()


def task_rows(cluster, hosts: list[str], keyspace: str, task_ids: list[str], level) -> set[str]:
    """Ids of the given tasks whose row a read at ``level`` through ``hosts`` finds."""
    c, session = session_on(cluster, *hosts)
    try:
        found = set()
        for i in range(0, len(task_ids), 100):
            chunk = task_ids[i:i + 100]
            statement = SimpleStatement(
                f"SELECT task_id, state FROM {keyspace}.tasks WHERE task_id IN ({','.join(['%s'] * len(chunk))})",
                consistency_level=level)
            found |= {r.task_id for r in session.execute(statement, chunk) if r.state is not None}
        return found
    finally:
        c.shutdown()


@pytest.fixture
def taskwheel_on_three(cassandra_three, tmp_path):
    """Starts taskwheel nodes on a fresh RF-3 keyspace of the three Cassandra nodes."""
    keyspace = f"replicas_{uuid.uuid4().hex[:10]}"
    url = cassandra_three.url(keyspace, shards=SHARDS)
    made: list[Node] = []

    def start(count: int) -> list[Node]:
        new = [Node(url, tmp_path, f"node{len(made) + i}") for i in range(count)]
        for node in new:
            node.start()
            made.append(node)
        return new

    start.keyspace = keyspace
    yield start
    for node in made:
        node.stop()


def test_one_cassandra_node_killed_under_load_loses_nothing_and_catches_up_when_back(
        cassandra_three, taskwheel_on_three):
    a, b = taskwheel_on_three(2)
    wait_until(lambda: balanced([a, b]), timeout=15)
    with QueueWorker(b.target, "one-down") as worker, Load(a.target, "one-down", rate=300) as load:
        time.sleep(4)
        cassandra_three.kill(3)
        time.sleep(10)  # the survivors' failure detector marks it down within this
        cassandra_three.start(3)
        time.sleep(4)
        load.stop()
        got = wait_delivered(worker, load.out.accepted, timeout=30)
    out = load.out
    assert len(out.accepted) >= 4_000
    assert out.codes.keys() == {"OK"}, f"Submit did not always answer OK: {out.codes}, e.g. " \
        f"{next(iter({**out.refused, **out.maybe}.values()), '')}"
    lost = set(out.accepted) - set(got)
    assert not lost, f"{len(lost)} of {len(out.accepted)} accepted tasks never delivered"
    early = [p for p, rs in got.items() for r in rs if r.received_ms < out.accepted[p][1]]
    assert not early, f"{len(early)} deliveries before their fire time"
    repeats = [p for p, rs in got.items() if len(rs) > 1]
    assert not [p for p in repeats if not any(r.redelivered for r in got[p][1:])], \
        "a repeat delivery without the redelivered flag"

    # Back: the survivors replay the writes node 3 missed (hints), and a read at ALL, which
    # needs every replica's answer, finds every accepted task.
    took = wait_until(lambda: pending_hints(cassandra_three, "127.0.0.1") == 0
                      and pending_hints(cassandra_three, "127.0.0.2") == 0, timeout=60, every=1)
    ids = [task_id for task_id, _ in out.accepted.values()]
    found = task_rows(cassandra_three, cassandra_three.hosts, taskwheel_on_three.keyspace, ids,
                      ConsistencyLevel.ALL)
    assert len(found) == len(ids), f"{len(ids) - len(found)} accepted tasks not found at ALL"
    print(f"hints replayed {took:.1f} s after the checks began; {len(repeats)} repeats")


def test_two_cassandra_nodes_down_refuses_submits_and_service_resumes_when_they_return(
        cassandra_three, taskwheel_on_three):
    (a,) = taskwheel_on_three(1)
    with QueueWorker(a.target, "two-down") as worker, Load(a.target, "two-down", rate=200) as load:
        time.sleep(3)
        before = len(load.out.accepted)
        cassandra_three.kill(1)
        cassandra_three.kill(2)
        # Submits now time out at the replicas, then (once node 3's failure detector has
        # marked its peers down) are refused outright.
        wait_until(lambda: len(load.out.refused) >= 200, timeout=40, every=0.5)
        down_accepted = len(load.out.accepted)
        cassandra_three.start()
        resumed = len(load.out.accepted)
        wait_until(lambda: load.accepted_since(resumed) >= 400, timeout=60, every=0.5)
        load.stop()
        got = wait_delivered(worker, load.out.accepted, timeout=60)
    out = load.out
    assert before > 0
    assert len(out.accepted) - down_accepted >= 400, "service did not resume"
    # First the replicas time out, then the coordinator knows them down and refuses at once.
    assert any("too few Cassandra replicas up: LOCAL_QUORUM needs 2 and the coordinator sees 1"
               in details for details in out.refused.values()), set(out.refused.values())
    assert out.retry_after_ms and min(out.retry_after_ms) > 0
    lost = set(out.accepted) - set(got)
    assert not lost, f"{len(lost)} of {len(out.accepted)} accepted tasks never delivered"
    refused_delivered = set(out.refused) & set(got)
    assert not refused_delivered, f"{len(refused_delivered)} refused tasks were delivered: " \
        f"{collections.Counter(out.refused[p] for p in refused_delivered)}, attempts " \
        f"{collections.Counter(r.attempt for p in refused_delivered for r in got[p])}"
    early = [p for p, rs in got.items() for r in rs if r.received_ms < out.accepted.get(p, (0, 0))[1]]
    assert not early, f"{len(early)} deliveries before their fire time"
    maybe_delivered = len(set(out.maybe) & set(got))
    print(f"codes {dict(out.codes)}; refused {len(out.refused)}, maybe stored {len(out.maybe)} "
          f"(of those delivered {maybe_delivered})")
