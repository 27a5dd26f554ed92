"""Fixtures shared across the suite: the Cassandra server and the stores end-to-end tests use.

Cassandra: TASKWHEEL_CASSANDRA=host:port when set (``make test`` starts one and sets it), else
one started for this test session with the dev launcher in a temporary directory, on free ports.
"""
from __future__ import annotations

import os
import uuid
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


@pytest.fixture(params=["sqlite", pytest.param("cassandra", marks=pytest.mark.cassandra)])
def store_url(request, tmp_path) -> str:
    """A --store URL for a fresh, empty store of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "tasks.db")
    host, port = request.getfixturevalue("cassandra_contact")
    return f"cassandra://{host}:{port}/e2e_{uuid.uuid4().hex[:12]}?shards=4"
