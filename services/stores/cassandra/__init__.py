"""The Apache Cassandra store (store.py, schema.cql) and a dev-server launcher (devserver.py)."""
from taskwheel.stores.cassandra.store import CassandraOptions, CassandraStore

__all__ = ["CassandraOptions", "CassandraStore"]
