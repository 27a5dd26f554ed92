"""SqliteReader in plain Python, a test oracle: Python's sqlite3 module with fetchall. The tests run
the same behaviours against it and the compiled taskwheel.stores.sqlite.rows."""
from __future__ import annotations

import os
import sqlite3
import urllib.parse
from typing import Any


class ReferenceSqliteReader:
    """SqliteReader through Python's sqlite3 module: one row stepped at a time, with the GIL."""

    def __init__(self, path: str | bytes | os.PathLike[str], sql: str, busy_timeout_ms: int = 5000,
                 cache_kib: int = 65536):
        from taskwheel.stores.sqlite.rows import SqliteReadError

        self._error = SqliteReadError
        self.path = os.fsdecode(path)
        self._sql = sql
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                f"file:{urllib.parse.quote(self.path)}?mode=ro", uri=True, isolation_level=None,
                check_same_thread=False,
            )
            self._conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            self._conn.execute(f"PRAGMA cache_size = -{cache_kib}")
            self._conn.execute("PRAGMA query_only = ON")
            self._conn.execute(f"EXPLAIN {sql}", (0,) * sql.count("?")).fetchall()  # it prepares
        except sqlite3.ProgrammingError:
            pass  # prepared, but a parameter is not a plain "?": rows() will tell
        except sqlite3.Error as e:
            raise SqliteReadError(f"cannot open {self.path}: {e}") from e

    def rows(self, params: tuple[int, ...]) -> list[tuple[Any, ...]]:
        return self._run(params)[1]

    def records(self, params: tuple[int, ...], shape: Any) -> list[Any]:
        columns, rows = self._run(params)
        if columns != shape.count:
            raise ValueError(
                f"the statement has {columns} columns, {shape.kind.__name__} {shape.count} fields")
        return [shape.build(row) for row in rows]

    def _run(self, params: tuple[int, ...]) -> tuple[int, list[tuple[Any, ...]]]:
        if self._conn is None:
            raise self._error(f"{self.path}: the reader is closed")
        try:
            cursor = self._conn.execute(self._sql, params)
            return len(cursor.description or ()), cursor.fetchall()
        except sqlite3.ProgrammingError as e:  # the wrong number of parameters
            raise ValueError(str(e)) from e
        except sqlite3.Error as e:
            raise self._error(f"{self.path}: {e}") from e

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
