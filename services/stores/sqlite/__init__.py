"""The embedded store: one SQLite file in WAL mode (store.py explains the layout)."""
# Python's sqlite3 first, so that the compiled reader binds to the SQLite library Python loaded
# (rows.pyx says why there must be one).
import sqlite3  # noqa: F401

from taskwheel.stores.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
