import os
from typing import Any

from taskwheel.core import RecordShape

class SqliteReadError(Exception):
    """SQLite refused to open, prepare or run a SqliteReader's statement."""

class SqliteReader:
    """One prepared statement on a read-only connection; rows are stepped without the GIL."""

    @property
    def path(self) -> str: ...
    def __init__(
        self, path: str | bytes | os.PathLike[str], sql: str, busy_timeout_ms: int = 5000,
        cache_kib: int = 65536,
    ) -> None: ...
    def rows(self, params: tuple[int, ...]) -> list[tuple[Any, ...]]: ...
    def records(self, params: tuple[int, ...], shape: RecordShape) -> list[Any]: ...
    def close(self) -> None: ...

def same_sqlite_as_python() -> bool:
    """Whether Python's sqlite3 module and SqliteReader share one copy of SQLite."""
