"""SqliteReader: every row of a statement on a read-only connection, as tuples, read without
the GIL; the same behaviours against ReferenceSqliteReader (Python's sqlite3)."""
import dataclasses
import gc
import os
import pathlib
import sqlite3
import threading
import time

import pytest

from taskwheel.core import RecordShape
from taskwheel.core.reference import ReferenceRecordShape
from taskwheel.stores.sqlite.reference import ReferenceSqliteReader
from taskwheel.stores.sqlite.rows import SqliteReader, SqliteReadError, same_sqlite_as_python


@pytest.fixture(params=[SqliteReader, ReferenceSqliteReader], ids=["compiled", "reference"])
def reader_cls(request):
    return request.param


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "rows.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, i INTEGER, f REAL, s TEXT, b BLOB)")
    yield path, conn
    conn.close()


SELECT = "SELECT k, i, f, s, b FROM t WHERE k >= ? AND k < ? ORDER BY k"


def test_every_kind_of_value_comes_back_as_python_gave_it(db, reader_cls):
    path, conn = db
    rows = [
        (1, -(1 << 63), 0.5, "plain", b"\x00binary\xff"),
        (2, (1 << 63) - 1, -1e300, "naïve ✓ 日本", b""),
        (3, None, None, "", None),
        (4, 0, 0.0, None, b"\x00" * 3),
    ]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", rows)
    reader = reader_cls(path, SELECT)
    try:
        assert reader.rows((0, 10)) == rows
        assert reader.rows((2, 4)) == rows[1:3]
        assert reader.rows((10, 20)) == []
    finally:
        reader.close()


def test_rows_beyond_the_first_buffers_all_arrive(db, reader_cls):
    path, conn = db
    big = bytes(range(256)) * 1024  # 256 KiB: larger than the first arena
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?, ?, 0.0, ?, ?)",
                     [(k, k * 3, f"task-{k}", big if k % 10_000 == 0 else b"p%d" % k)
                      for k in range(50_000)])
    conn.execute("COMMIT")
    reader = reader_cls(path, SELECT)
    try:
        for _ in range(2):  # the buffers of one read are reused by the next
            got = reader.rows((0, 50_000))
            assert len(got) == 50_000
            assert got[12_345] == (12_345, 37_035, 0.0, "task-12345", b"p12345")
            assert got[20_000][4] == big
    finally:
        reader.close()


@dataclasses.dataclass(slots=True)
class Row:
    k: int
    i: int | None
    f: float | None
    s: str | None
    b: bytes | None


@pytest.fixture(params=[(SqliteReader, RecordShape), (ReferenceSqliteReader, ReferenceRecordShape)],
                ids=["compiled", "reference"])
def reader_and_shape(request):
    return request.param


def test_records_are_the_rows_as_instances_converted_per_column(db, reader_and_shape):
    reader_cls, shape_cls = reader_and_shape
    path, conn = db
    rows = [(k, k % 3, k / 2, "same" if k < 3 else f"s{k}", b"x%d" % k) for k in range(6)]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", rows)
    names = {0: "zero", 1: "one", 2: "two"}
    shape = shape_cls(Row, ["k", "i", "f", "s", "b"], [None, names, None, str.upper, None])
    reader = reader_cls(path, SELECT)
    try:
        got = reader.records((0, 10), shape)
        assert got == [Row(k, ("zero", "one", "two")[i], f, s.upper(), b) for k, i, f, s, b in rows]
        assert reader.records((10, 20), shape) == []
    finally:
        reader.close()


def test_compiled_records_share_a_text_equal_to_the_row_above_and_are_untracked(db):
    path, conn = db
    conn.executemany("INSERT INTO t VALUES (?, 0, 0.0, ?, NULL)",
                     [(1, "queue-a"), (2, "queue-a"), (3, "queue-b"), (4, "queue-a"), (5, "queue-a")])
    reader = SqliteReader(path, SELECT)
    try:
        got = reader.records((0, 10), RecordShape(Row, ["k", "i", "f", "s", "b"]))
    finally:
        reader.close()
    assert [r.s for r in got] == ["queue-a", "queue-a", "queue-b", "queue-a", "queue-a"]
    assert got[0].s is got[1].s and got[3].s is got[4].s and got[1].s is not got[3].s
    assert not any(gc.is_tracked(r) for r in got) and not gc.is_tracked(got)


def test_compiled_records_share_an_integer_equal_to_the_row_above_or_to_the_column_before(db):
    path, conn = db
    big = 1_764_000_000_000  # a millisecond time: an int object of its own, not a cached small one
    conn.executemany("INSERT INTO t VALUES (?, ?, 0.0, 's', NULL)",
                     [(big, big), (big + 1, big), (big + 2, big + 3), (big + 4, big + 4)])
    reader = SqliteReader(path, SELECT)
    try:
        got = reader.records((0, 2 * big), RecordShape(Row, ["k", "i", "f", "s", "b"]))
    finally:
        reader.close()
    assert [(r.k, r.i) for r in got] == [(big, big), (big + 1, big), (big + 2, big + 3), (big + 4, big + 4)]
    assert got[0].i is got[0].k  # the column before, in its row
    assert got[1].i is got[0].i  # the row above
    assert got[3].i is got[3].k and got[2].i is not got[1].i


def test_records_of_a_shape_with_other_columns_are_refused(db, reader_and_shape):
    reader_cls, shape_cls = reader_and_shape
    path, _ = db

    @dataclasses.dataclass(slots=True)
    class Pair:
        k: int
        i: int

    reader = reader_cls(path, SELECT)
    try:
        with pytest.raises(ValueError, match="5 columns"):
            reader.records((0, 10), shape_cls(Pair, ["k", "i"]))
    finally:
        reader.close()


def test_a_failing_converter_raises_and_the_reader_reads_on(db, reader_and_shape):
    reader_cls, shape_cls = reader_and_shape
    path, conn = db
    conn.executemany("INSERT INTO t VALUES (?, ?, 0.0, 's', NULL)", [(1, 0), (2, 7)])
    shape = shape_cls(Row, ["k", "i", "f", "s", "b"], [None, {0: "zero"}, None, None, None])
    reader = reader_cls(path, SELECT)
    try:
        with pytest.raises(KeyError):
            reader.records((0, 10), shape)
        assert [r.i for r in reader.records((0, 2), shape)] == ["zero"]
    finally:
        reader.close()


def test_a_read_sees_what_was_committed_after_the_reader_opened(db, reader_cls):
    path, conn = db
    reader = reader_cls(path, SELECT)
    try:
        assert reader.rows((0, 10)) == []
        conn.execute("INSERT INTO t VALUES (5, 1, 1.0, 'later', x'01')")
        assert reader.rows((0, 10)) == [(5, 1, 1.0, "later", b"\x01")]
    finally:
        reader.close()


def test_the_connection_is_read_only(db, reader_cls):
    path, _ = db
    reader = reader_cls(path, "INSERT INTO t (k) VALUES (?)")
    try:
        with pytest.raises(SqliteReadError, match="readonly|read-only|attempt to write"):
            reader.rows((1,))
    finally:
        reader.close()


def test_a_missing_file_is_refused_by_name(tmp_path, reader_cls):
    with pytest.raises(SqliteReadError, match="nowhere.db"):
        reader_cls(str(tmp_path / "nowhere.db"), "SELECT 1")


def test_a_statement_sqlite_cannot_prepare_is_refused_with_its_reason(db, reader_cls):
    path, _ = db
    with pytest.raises(SqliteReadError, match="no such table: missing"):
        reader_cls(path, "SELECT * FROM missing WHERE k = ?")


def test_the_wrong_number_of_parameters_is_refused(db, reader_cls):
    path, _ = db
    reader = reader_cls(path, SELECT)
    try:
        with pytest.raises(ValueError):
            reader.rows((1,))
    finally:
        reader.close()


def test_a_closed_reader_refuses_to_read(db, reader_cls):
    path, _ = db
    reader = reader_cls(path, SELECT)
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(SqliteReadError, match="closed"):
        reader.rows((0, 1))


def test_text_that_is_not_utf8_is_refused_not_altered(db, reader_cls):
    path, conn = db
    conn.execute("INSERT INTO t (k, s) VALUES (1, CAST(x'66ff6f' AS TEXT))")
    reader = reader_cls(path, SELECT)
    try:
        with pytest.raises(SqliteReadError, match="UTF-8"):
            reader.rows((0, 10))
    finally:
        reader.close()


def test_a_path_may_be_bytes_or_a_path_object(db, reader_cls):
    path, conn = db
    conn.execute("INSERT INTO t (k) VALUES (1)")
    for given in (os.fsencode(path), pathlib.Path(path)):
        reader = reader_cls(given, SELECT)
        try:
            assert [row[0] for row in reader.rows((0, 10))] == [1]
        finally:
            reader.close()


SLOW_COUNT = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
              "SELECT count(*) FROM n WHERE x > ?")


def test_a_second_call_while_one_reads_is_refused_not_run_on_the_same_buffers(db):
    path, _ = db
    reader = SqliteReader(path, SLOW_COUNT)
    started, result = threading.Event(), []

    def read():
        started.set()
        result.extend(reader.rows((3_000_000, 0)))

    thread = threading.Thread(target=read)
    thread.start()
    started.wait()
    time.sleep(0.05)  # the thread is stepping, the GIL released
    with pytest.raises(RuntimeError, match="already reading"):
        reader.rows((10, 0))
    with pytest.raises(RuntimeError, match="cannot close"):
        reader.close()
    thread.join()
    assert result == [(3_000_000,)]
    reader.close()


def test_other_threads_run_while_the_compiled_reader_steps(db):
    """The point of SqliteReader: the GIL is free while SQLite works. A query that takes SQLite
    a few hundred ms runs on a thread; the main thread keeps ticking meanwhile. (Python's
    sqlite3 releases the GIL around each step too; what it cannot do is skip retaking it for
    every row, which this test does not see.)"""
    path, _ = db
    reader = SqliteReader(path, SLOW_COUNT)
    done = threading.Event()
    result = []

    def read():
        result.extend(reader.rows((3_000_000, 0)))
        done.set()

    thread = threading.Thread(target=read)
    started = time.perf_counter()
    last, worst = started, 0.0
    thread.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    thread.join()
    reader.close()
    took = time.perf_counter() - started
    assert result == [(3_000_000,)]
    assert took > 0.1, "the query ended too soon to tell anything"
    assert worst < took / 2, f"the main thread stalled {worst * 1000:.0f} ms of a {took * 1000:.0f} ms read"


def test_this_python_and_the_core_share_one_sqlite():
    # Python's sqlite3 module here links the system's libsqlite3, as the core does; were it not
    # so, the embedded store would read through JSON instead (tests/services/stores checks both), and
    # the performance figures would not be those of the compiled reader.
    assert same_sqlite_as_python()
