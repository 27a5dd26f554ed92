"""The Apache Cassandra store (store.py) and a dev-server launcher (devserver.py)."""
