"""Turns a --store URL into a Store.

    sqlite:///abs/path/tasks.db   (or a bare path)       the embedded store (default)
    cassandra://host:port/keyspace?shards=256            Apache Cassandra
    cassandra://h1,h2,h3:port/keyspace?replication_factor=3   contact points of a cluster

The shard count is fixed when a store is created; 0 (the default) opens an existing store with
its own count and creates a new one with the store's default (16 embedded, 256 on Cassandra).
"""
from __future__ import annotations

import urllib.parse

from taskwheel.stores.base import Store


def open_store(url: str, *, num_shards: int = 0) -> Store:
    """Builds (does not yet open) the store a URL names. Raises ValueError for a bad URL."""
    parsed = urllib.parse.urlparse(url)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    if "shards" in query:
        num_shards = int(query.pop("shards"))
    if parsed.scheme in ("", "sqlite", "file"):
        from taskwheel.stores.sqlite import SqliteStore

        path = parsed.path if parsed.scheme else url
        if not path:
            raise ValueError(f"store URL {url!r} names no database file")
        return SqliteStore(path, num_shards=num_shards, **query)
    if parsed.scheme == "cassandra":
        from taskwheel.stores.cassandra import CassandraStore

        keyspace = parsed.path.lstrip("/") or "taskwheel"
        # Several contact points: the store opens while any one of them is up.
        hosts = [h for h in (parsed.hostname or "").split(",") if h] or ["127.0.0.1"]
        return CassandraStore(
            hosts=hosts,
            port=parsed.port or 9042,
            keyspace=keyspace,
            num_shards=num_shards,
            **query,
        )
    raise ValueError(f"unknown store scheme {parsed.scheme!r} in {url!r}: use sqlite:// or cassandra://")
