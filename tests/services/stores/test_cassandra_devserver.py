"""The dev launcher (taskwheel dev cassandra start|stop|status) and CassandraStore across a
Cassandra that stops, restarts or dies under it. Real servers, started from the Maven jars."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from taskwheel.stores import StoreUnavailable
from taskwheel.task import TaskRecord
from taskwheel.core import BUCKET_MS
from taskwheel.stores.cassandra import CassandraStore, devserver

pytestmark = pytest.mark.cassandra


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A node of this module's own: tests here stop, restart and kill it. Not --fast: that
    mode gives up durability across a kill -9, which one test here checks."""
    directory = tmp_path_factory.mktemp("node")
    devserver.start(directory)
    yield directory
    devserver.stop(directory)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def tasks(n: int, due_ms: int) -> list[TaskRecord]:
    now = now_ms()
    return [
        TaskRecord(task_id=uuid.uuid4().hex, shard=i % 4, queue="q", payload=b"p%d" % i,
                   fire_at_ms=due_ms + i, due_ms=due_ms + i, created_ms=now, updated_ms=now)
        for i in range(n)
    ]


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            if len(address) == 8:
                ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
            else:
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
                ip = socket.inet_ntop(socket.AF_INET6, raw)
            found.add((ip, int(port, 16)))
    return found


# ---- the launcher ------------------------------------------------------------------------------

def test_ports_derive_from_the_cql_port():
    ports = devserver.Ports(19042)
    assert (ports.cql, ports.storage, ports.jmx) == (19042, 19043, 19044)
    assert ports.all() == (19042, 19043, 19044)


def test_cluster_nodes_share_cql_and_storage_ports_on_their_own_addresses():
    ports = devserver.Ports(19042, nodes=3)
    assert ports.bindings() == [
        ("127.0.0.1", 19042), ("127.0.0.1", 19043), ("127.0.0.1", 19044),
        ("127.0.0.2", 19042), ("127.0.0.2", 19043), ("127.0.0.1", 19045),
        ("127.0.0.3", 19042), ("127.0.0.3", 19043), ("127.0.0.1", 19046)]
    tokens = [n.token for n in devserver.members(Path("/x"), ports)]
    assert tokens == sorted(tokens) and tokens[0] == -(2 ** 63)
    assert tokens[1] - tokens[0] == tokens[2] - tokens[1] == 2 ** 64 // 3


def test_start_refuses_another_node_count_for_a_directory(tmp_path, capsys):
    (tmp_path / devserver.PORT_FILE).write_text("19042 3\n")
    assert devserver.main(["start", "--dir", str(tmp_path), "--nodes", "1"]) == 1
    assert "holds a cluster of 3 node(s), not 1" in capsys.readouterr().err
    assert devserver.main(["start", "--dir", str(tmp_path), "--node", "4"]) == 1
    assert "the cluster has nodes 1 to 3" in capsys.readouterr().err


def test_cluster_nodes_listen_on_their_loopback_address_and_status_lists_each(cassandra_three, capsys):
    for node in devserver.members(cassandra_three.dir, devserver.saved_ports(cassandra_three.dir)):
        listening = listening_addresses(devserver.running_pid(node.dir))
        assert listening == set(node.ports.bindings_of(node.index))
    assert devserver.main(["status", "--dir", str(cassandra_three.dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["node 1", "node 2", "node 3"]
    assert all(f"127.0.0.{i}:{cassandra_three.port}" in lines[i - 1] for i in (1, 2, 3))


def test_start_on_a_taken_port_fails_naming_the_ports(tmp_path, capsys):
    ports = devserver.free_ports()
    with socket.socket() as taken:
        taken.bind((devserver.HOST, ports.storage))
        taken.listen()
        code = devserver.main(["start", "--dir", str(tmp_path), "--port", str(ports.cql)])
    assert code == 1
    assert f"127.0.0.1:{ports.storage} taken" in capsys.readouterr().err
    assert not (tmp_path / devserver.PID_FILE).exists()


def test_failed_start_reports_the_log_tail(tmp_path):
    with pytest.raises(devserver.DevServerError) as failed:
        devserver.start(tmp_path, heap="1X", timeout=60)
    assert "exited with status" in str(failed.value)
    assert "Invalid" in str(failed.value)  # the JVM's own complaint about the heap size


def test_stop_and_status_of_a_directory_that_never_ran(tmp_path, capsys):
    assert devserver.main(["stop", "--dir", str(tmp_path)]) == 0
    assert devserver.main(["status", "--dir", str(tmp_path)]) == 3
    assert "stopped" in capsys.readouterr().out


def test_start_of_a_running_node_prints_its_contact_point(node, capsys):
    port = devserver.saved_ports(node).cql
    assert devserver.main(["start", "--dir", str(node)]) == 0
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{port}"
    assert devserver.main(["status", "--dir", str(node)]) == 0
    assert f"127.0.0.1:{port}" in capsys.readouterr().out


def test_node_listens_on_loopback_only_on_its_derived_ports(node):
    ports = devserver.saved_ports(node)
    listening = listening_addresses(devserver.running_pid(node))
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} == set(ports.all())


def test_two_nodes_coexist(node, tmp_path):
    second = devserver.start(tmp_path, fast=True)
    try:
        assert second.cql != devserver.saved_ports(node).cql
        assert devserver.cql_answers(second.cql)
        assert devserver.cql_answers(devserver.saved_ports(node).cql)
    finally:
        assert devserver.stop(tmp_path)
    assert not devserver.cql_answers(second.cql)
    assert devserver.main(["status", "--dir", str(tmp_path)]) == 3


# ---- the store across outages ------------------------------------------------------------------

async def until_available(store: CassandraStore, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await store.get("probe")
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def all_there(store: CassandraStore, stored: list[TaskRecord],
                    maybe: Sequence[TaskRecord] = ()) -> None:
    """Every task in stored is there, by id and in its due slice; nothing else is, except tasks
    in maybe: inserts that answered StoreUnavailable, whose outcome is unknown (Cassandra may
    have applied them before the client gave up waiting)."""
    got = await asyncio.gather(*(store.get(t.task_id) for t in stored))
    assert [g.task_id if g else None for g in got] == [t.task_id for t in stored]
    start = min(t.due_ms for t in stored)
    loaded = await asyncio.gather(*(store.load_due(s, start, start + BUCKET_MS) for s in range(4)))
    ids = [r.task_id for rows in loaded for r in rows]
    assert len(ids) == len(set(ids)), "a task loaded twice"
    missing = {t.task_id for t in stored} - set(ids)
    assert not missing, f"{len(missing)} acknowledged tasks not in their due slice"
    strays = set(ids) - {t.task_id for t in stored} - {t.task_id for t in maybe}
    assert not strays, f"{len(strays)} tasks loaded that nobody inserted"


async def test_store_is_unavailable_while_cassandra_is_stopped_and_recovers_on_restart(node):
    port = devserver.saved_ports(node).cql
    store = CassandraStore(["127.0.0.1"], port, f"outage_{uuid.uuid4().hex[:8]}", num_shards=4,
                           request_timeout_s=2)
    due = (now_ms() // BUCKET_MS + 5) * BUCKET_MS

    await store.open()
    committed = tasks(200, due)
    await store.insert(committed)
    unknown: list[TaskRecord] = []  # inserts that answered StoreUnavailable
    outcomes: list[str] = []

    async def writer() -> None:  # keeps inserting while Cassandra goes away
        while len(outcomes) < 10_000:
            began = time.monotonic()
            try:
                batch = tasks(20, due + 30_000)
                await store.insert(batch)
                committed.extend(batch)
                outcomes.append("ok")
            except StoreUnavailable:
                unknown.extend(batch)
                outcomes.append("unavailable")
                await asyncio.sleep(0.05)
            assert time.monotonic() - began < 15, "a store call hung"
            if outcomes[-3:] == ["unavailable"] * 3:
                return

    writing = asyncio.ensure_future(writer())
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, devserver.stop, node)
    await asyncio.wait_for(writing, 60)
    assert "ok" in outcomes and outcomes[-1] == "unavailable"
    with pytest.raises(StoreUnavailable):
        await store.get(committed[0].task_id)
    with pytest.raises(StoreUnavailable):
        await store.load_due(0, due, due + BUCKET_MS)

    assert (await loop.run_in_executor(None, devserver.start, node)).cql == port
    await until_available(store)
    await all_there(store, committed, unknown)
    fresh = tasks(5, due)
    assert [o.duplicate for o in await store.insert(fresh)] == [False] * 5
    await store.close()


async def test_acknowledged_inserts_survive_kill_9_of_cassandra(node):
    port = devserver.saved_ports(node).cql
    keyspace = f"crash_{uuid.uuid4().hex[:8]}"
    due = (now_ms() // BUCKET_MS + 5) * BUCKET_MS

    store = CassandraStore(["127.0.0.1"], port, keyspace, num_shards=4)
    await store.open()
    acknowledged = tasks(500, due)
    await store.insert(acknowledged)
    os.kill(devserver.running_pid(node), signal.SIGKILL)
    await store.close()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, devserver.start, node)
    again = CassandraStore(["127.0.0.1"], port, keyspace, num_shards=4)
    await again.open()
    await all_there(again, acknowledged)
    await again.close()
