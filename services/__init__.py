"""taskwheel: a distributed task scheduler.

Layout: ``taskwheel.core`` (compiled timing wheel and batcher), ``taskwheel.v1`` (the gRPC
contract), one package per service (``ingest``, ``timer``, ``dispatch``), ``stores`` (embedded
SQLite and Apache Cassandra behind one interface), ``client`` and ``cli``.
"""
__version__ = "0.1.0"
