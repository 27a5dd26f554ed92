"""Fixtures shared across the suite: the Cassandra server and the stores end-to-end tests use.

Cassandra: TASKWHEEL_CASSANDRA=host:port when set, else one started for this test session with
the dev launcher in a temporary directory, on free ports. The three-node cluster of the
replication tests: TASKWHEEL_CASSANDRA_CLUSTER=DIR names one started with ``taskwheel dev
cassandra start --dir DIR --nodes 3``, else the session starts its own on first use.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def cassandra_contact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a Cassandra that answers CQL."""
    given = os.environ.get("TASKWHEEL_CASSANDRA")
    if given:
        host, _, port = given.rpartition(":")
        yield host or "127.0.0.1", int(port)
        return
    from taskwheel.stores.cassandra import devserver

    directory = tmp_path_factory.mktemp("cassandra")
    ports = devserver.start(directory, fast=True, heap="1G")
    try:
        yield devserver.HOST, ports.cql
    finally:
        devserver.stop(directory)


@dataclass
class CassandraCluster:
    """Three Cassandra nodes on 127.0.0.1-3, one port, started by the dev launcher; tests kill
    and restart them."""

    dir: Path
    port: int
    nodes: int = 3

    @property
    def hosts(self) -> list[str]:
        from taskwheel.stores.cassandra import devserver

        return [devserver.host_of(i) for i in range(1, self.nodes + 1)]

    def url(self, keyspace: str, **options: object) -> str:
        """A --store URL naming every node, replication factor 3 unless given."""
        options.setdefault("replication_factor", 3)
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"cassandra://{','.join(self.hosts)}:{self.port}/{keyspace}?{query}"

    def kill(self, node: int) -> None:
        from taskwheel.stores.cassandra import devserver

        assert devserver.kill(self.dir, node), f"node {node} was not running"

    def start(self, node: int | None = None) -> None:
        """Starts the node (or every stopped one) and waits until it answers CQL."""
        from taskwheel.stores.cassandra import devserver

        devserver.start(self.dir, node=node)

    def up(self) -> list[int]:
        from taskwheel.stores.cassandra import devserver

        return [n.index for n, pid, answers in devserver.status(self.dir) if answers]


@pytest.fixture(scope="session")
def cassandra_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraCluster]:
    """Three durable nodes (kill -9 loses nothing acknowledged), all up at the start of every
    test that takes the fixture through ``cassandra_three``."""
    from taskwheel.stores.cassandra import devserver

    given = os.environ.get("TASKWHEEL_CASSANDRA_CLUSTER")
    if given:
        ports = devserver.saved_ports(Path(given).absolute())
        assert ports is not None and ports.nodes == 3, f"{given}: not a 3-node dev cluster"
        yield CassandraCluster(Path(given).absolute(), ports.cql)
        return
    directory = tmp_path_factory.mktemp("cassandra-3")
    ports = devserver.start(directory, nodes=3, heap="768M")
    _STOP_CLUSTER.append(lambda: devserver.stop(directory))
    try:
        yield CassandraCluster(directory, ports.cql)
    finally:
        devserver.stop(directory)


# Three idle JVMs still take CPU: the cluster stops after the last test that uses it rather than
# at the end of the session, where it would run beside every later (timing-sensitive) test.
_STOP_CLUSTER: list = []
_LAST_CLUSTER_TEST: list = []


def pytest_collection_modifyitems(session, config, items):
    users = [item for item in items if "cassandra_cluster" in getattr(item, "fixturenames", ())]
    _LAST_CLUSTER_TEST[:] = users[-1:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # after the test's own fixtures, which may start killed nodes again
    if _LAST_CLUSTER_TEST and item is _LAST_CLUSTER_TEST[0]:
        for stop in _STOP_CLUSTER:
            stop()


@pytest.fixture
def cassandra_three(cassandra_cluster: CassandraCluster) -> Iterator[CassandraCluster]:
    """The three-node cluster with every node up, and again up after the test (which may kill
    some)."""
    cassandra_cluster.start()
    yield cassandra_cluster
    cassandra_cluster.start()


@pytest.fixture(params=["sqlite", pytest.param("cassandra", marks=pytest.mark.cassandra)])
def store_url(request, tmp_path) -> str:
    """A --store URL for a fresh, empty store of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "tasks.db")
    host, port = request.getfixturevalue("cassandra_contact")
    return f"cassandra://{host}:{port}/e2e_{uuid.uuid4().hex[:12]}?shards=4"
