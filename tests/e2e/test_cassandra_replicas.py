"""taskwheel on three Cassandra nodes (replication factor 3) while Cassandra nodes die and return.

Real processes: the dev launcher's three JVMs on 127.0.0.1-3, `taskwheel up` nodes, a steady
load submitted over gRPC and workers on plain Consume streams. Every submitted task carries a
unique payload, so a task whose Submit was refused is recognised if it is ever delivered."""
from __future__ import annotations

import collections
import time
import uuid

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy
from cassandra.query import SimpleStatement

from tests.e2e.harness import Load, QueueWorker
from tests.e2e.test_cluster import SHARDS, balanced, node_starter, wait_delivered, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cassandra]


def by_payload(delivery) -> bytes:
    """Refused tasks have no id: every task is told apart by its payload."""
    return delivery.payload


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
    start, made = node_starter(cassandra_three.url(keyspace, shards=SHARDS), tmp_path)
    start.keyspace = keyspace
    yield start
    for node in made:
        node.stop()


def test_one_cassandra_node_killed_under_load_loses_nothing_and_catches_up_when_back(
        cassandra_three, taskwheel_on_three):
    a, b = taskwheel_on_three(2)
    wait_until(lambda: balanced([a, b]), timeout=15)
    # A light load: three JVMs, two nodes, the load and the worker share two cores.
    with QueueWorker(b.target, "one-down") as worker, \
            Load([a.target], "one-down", rate=100, lease_s=5) as load:
        time.sleep(4)
        cassandra_three.kill(3)
        at_kill = len(load.accepted)
        time.sleep(10)  # long enough for the survivors' failure detector to mark it down
        during = len(load.accepted) - at_kill
        cassandra_three.start(3)
        time.sleep(4)
        load.stop()
        got = wait_delivered([worker], load.accepted_payloads, 30, key=by_payload)
    assert during >= 200, f"only {during} tasks accepted in the 10 s node 3 was down"
    assert load.codes.keys() == {"OK"}, f"Submit did not always answer OK: {load.codes}, e.g. " \
        f"{next(iter({**load.refused, **load.maybe}.values()), '')}"
    lost = set(load.accepted_payloads) - set(got)
    assert not lost, f"{len(lost)} of {len(load.accepted)} accepted tasks never delivered"
    early = [p for p, rs in got.items() for r in rs if r.received_ms < load.accepted[r.task_id]]
    assert not early, f"{len(early)} deliveries before their fire time"
    repeats = [p for p, rs in got.items() if len(rs) > 1]
    assert not [p for p in repeats if not any(r.redelivered for r in got[p][1:])], \
        "a repeat delivery without the redelivered flag"

    # Back: the survivors replay the writes node 3 missed (hints), and a read at ALL, which
    # needs every replica's answer, finds every accepted task.
    took = wait_until(lambda: pending_hints(cassandra_three, "127.0.0.1") == 0
                      and pending_hints(cassandra_three, "127.0.0.2") == 0, timeout=60, every=1)
    ids = list(load.accepted)
    found = task_rows(cassandra_three, cassandra_three.hosts, taskwheel_on_three.keyspace, ids,
                      ConsistencyLevel.ALL)
    assert len(found) == len(ids), f"{len(ids) - len(found)} accepted tasks not found at ALL"
    print(f"{during} accepted while node 3 was down; hints replayed {took:.1f} s after the checks "
          f"began; {len(repeats)} repeats")


def test_two_cassandra_nodes_down_refuses_submits_and_service_resumes_when_they_return(
        cassandra_three, taskwheel_on_three):
    (a,) = taskwheel_on_three(1)
    with QueueWorker(a.target, "two-down") as worker, \
            Load([a.target], "two-down", rate=200, lease_s=5) as load:
        time.sleep(3)
        before = len(load.accepted)
        cassandra_three.kill(1)
        cassandra_three.kill(2)
        # Submits now time out at the replicas, then (once node 3's failure detector has
        # marked its peers down) are refused outright.
        wait_until(lambda: len(load.refused) >= 200, timeout=40, every=0.5)
        down_accepted = len(load.accepted)
        cassandra_three.start()
        resumed = len(load.accepted)
        wait_until(lambda: len(load.accepted) - resumed >= 400, timeout=60, every=0.5)
        load.stop()
        got = wait_delivered([worker], load.accepted_payloads, 60, key=by_payload)
    assert before > 0
    assert len(load.accepted) - down_accepted >= 400, "service did not resume"
    # First the replicas time out, then the coordinator knows them down and refuses at once.
    assert any("too few Cassandra replicas up: LOCAL_QUORUM needs 2 and the coordinator sees 1"
               in details for details in load.refused.values()), set(load.refused.values())
    assert load.retry_after_ms and min(load.retry_after_ms) > 0
    lost = set(load.accepted_payloads) - set(got)
    assert not lost, f"{len(lost)} of {len(load.accepted)} accepted tasks never delivered"
    refused_delivered = set(load.refused) & set(got)
    assert not refused_delivered, f"{len(refused_delivered)} refused tasks were delivered: " \
        f"{collections.Counter(load.refused[p] for p in refused_delivered)}, attempts " \
        f"{collections.Counter(r.attempt for p in refused_delivered for r in got[p])}"
    early = [p for p, rs in got.items() for r in rs if r.received_ms < load.accepted.get(r.task_id, 0)]
    assert not early, f"{len(early)} deliveries before their fire time"
    maybe_delivered = len(set(load.maybe) & set(got))
    print(f"codes {dict(load.codes)}; refused {len(load.refused)}, maybe stored {len(load.maybe)} "
          f"(of those delivered {maybe_delivered})")
