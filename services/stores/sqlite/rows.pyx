# cython: language_level=3
# boundscheck, wraparound and initializedcheck come from setup.py: off, and on under TASKWHEEL_DEBUG=1.
"""All the rows of a query on a read-only SQLite connection, read without the GIL.

Why: the timer loads each second's due tasks, 50,000 rows at 50K fires/s, on the store's reader
thread while the event loop fires and delivers on the main thread, and both need the GIL.
Python's sqlite3 takes the GIL back after every row it steps, and each time it must wait for
the loop to let go of it (a switch interval when the loop is busy); so the embedded store read
a slice as one JSON array built by SQLite, then decoded it in Python: 2.6 us of GIL per row
(JSON decode 1.7, hex payloads 0.4, the record 0.5), and SQLite's work building the JSON
besides. Here the rows are stepped and copied into C buffers with the GIL released, then
turned into tuples in one pass that holds it.

One SQLite library: this module links the same shared libsqlite3 as Python's sqlite3 module,
and must, because two copies of SQLite in one process do not see each other's POSIX locks on
a file, and closing a file in one copy drops the locks the other holds on it (SQLite's
"howtocorrupt" page, 2.2.1). ``same_sqlite_as_python()`` asks SQLite whether this process has
one copy; the store uses this reader only then. taskwheel.stores.sqlite imports Python's sqlite3 before
this module, so the dynamic linker finds the library Python loaded (by its soname) and binds
this module to it rather than loading the system's beside it.

Threading: a reader is used by one thread at a time (the store's reader thread); SQLite's
connection is opened with its own mutex off for that reason, and a call made while another is
stepping is refused. Building the tuples (or, with ``records``, the instances of a
RecordShape, with no tuple between) holds the GIL; it lets go of it for a moment every 1,024
rows, so a waiting event loop is not kept out for a whole slice.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_FromDouble
from cpython.long cimport PyLong_FromLongLong
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
import os

from libc.stdint cimport int64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy

from taskwheel.core.records cimport RecordShape, untrack_container

cdef object _same_sqlite = None  # the answer, once asked: the libraries cannot change


def same_sqlite_as_python():
    """True if Python's sqlite3 module and this one use one copy of SQLite in this process.

    Asked of SQLite itself, once a process: an in-memory database in shared-cache mode is
    visible, by name, to every connection of the same copy of the library and to no other.
    Python's sqlite3 makes one with a table in it; this module's copy opens it by name and
    looks for the table.
    """
    global _same_sqlite
    if _same_sqlite is None:
        import sqlite3
        import uuid

        uri = f"file:taskwheel-probe-{uuid.uuid4().hex}?mode=memory&cache=shared"
        theirs = sqlite3.connect(uri, uri=True)
        try:
            theirs.execute("CREATE TABLE probe (x)")
            _same_sqlite = _sees_table(uri.encode(), b"SELECT count(*) FROM probe")
        finally:
            theirs.close()
    return _same_sqlite


cdef bint _sees_table(bytes uri, bytes sql):
    cdef sqlite3 *db = NULL
    cdef sqlite3_stmt *stmt = NULL
    cdef bint seen = False
    if sqlite3_open_v2(uri, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, NULL) == SQLITE_OK:
        seen = sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) == SQLITE_OK
        sqlite3_finalize(stmt)
    sqlite3_close_v2(db)
    return seen


class SqliteReadError(Exception):
    """SQLite refused to open, prepare or run; the message is SQLite's."""


cdef class SqliteReader:
    """A read-only connection to one database file and one prepared statement on it.

    ``rows(params)`` binds the integer parameters, steps the statement to its end with the GIL
    released, and returns every row as a tuple (int, float, str, bytes or None per column).
    """
    def __cinit__(self, path, str sql, int busy_timeout_ms=5000, int cache_kib=65536):
        self.path = os.fsdecode(path)
        cdef bytes encoded_path = os.fsencode(path)
        cdef bytes encoded_sql = sql.encode()
        cdef bytes pragmas = f"PRAGMA cache_size = -{cache_kib}; PRAGMA query_only = ON".encode()
        cdef int rc
        rc = sqlite3_open_v2(encoded_path, &self.db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL)
        if rc != SQLITE_OK:
            self._fail("cannot open")
        sqlite3_busy_timeout(self.db, busy_timeout_ms)
        if sqlite3_exec(self.db, pragmas, NULL, NULL, NULL) != SQLITE_OK:
            self._fail("cannot set up")
        if sqlite3_prepare_v2(self.db, encoded_sql, -1, &self.stmt, NULL) != SQLITE_OK:
            self._fail("cannot prepare")
        self.columns = sqlite3_column_count(self.stmt)
        self.parameters = sqlite3_bind_parameter_count(self.stmt)

    cdef _fail(self, str what):
        message = sqlite3_errmsg(self.db).decode(errors="replace") if self.db else "out of memory"
        self._close()
        raise SqliteReadError(f"{what} {self.path}: {message}")

    def close(self):
        """Closes the connection; idempotent. Refused while another thread reads."""
        if self.busy:
            raise RuntimeError(f"{self.path}: cannot close a reader that is reading")
        self._close()

    cdef void _close(self) noexcept:
        if self.stmt:
            sqlite3_finalize(self.stmt)
            self.stmt = NULL
        if self.db:
            sqlite3_close_v2(self.db)
            self.db = NULL

    def __dealloc__(self):
        self._close()
        free(self.values)
        free(self.arena)

    def rows(self, tuple params):
        """Every row of the statement run with ``params`` (ints), as a list of tuples."""
        return self._read(params, None)

    def records(self, tuple params, RecordShape shape not None):
        """Every row of the statement run with ``params`` (ints), each as an instance of
        ``shape.kind`` whose fields are the row's columns in order (see RecordShape), built
        without its ``__init__`` and out of the cyclic GC's view, as is the list. A text or an
        integer equal to the same column's in the row before is that row's object, not a copy
        (a queue name, an empty error, a lease), and so is an integer equal to the column
        before it in its row (a first attempt's due time, its fire time): at 50K fires/s each
        object of a record is a cache miss when the record fires, seconds after it was read,
        and another when it is freed."""
        if shape.count != self.columns:
            raise ValueError(
                f"the statement has {self.columns} columns, {shape.kind.__name__} {shape.count} fields")
        return self._read(params, shape)

    cdef list _read(self, tuple params, RecordShape shape):
        if not self.stmt:
            raise SqliteReadError(f"{self.path}: the reader is closed")
        if self.busy:
            raise RuntimeError(f"{self.path}: the reader is already reading on another thread")
        if len(params) != self.parameters:
            raise ValueError(f"the statement takes {self.parameters} parameters, not {len(params)}")
        cdef int i
        for i in range(self.parameters):
            sqlite3_bind_int64(self.stmt, i + 1, params[i])
        cdef Py_ssize_t count = 0, used = 0
        cdef int rc
        self.busy = True
        try:
            with nogil:
                rc = self._step_all(&count, &used)
            sqlite3_reset(self.stmt)
            if rc == -1:
                raise MemoryError("no memory for the rows of a SQLite read")
            if rc != SQLITE_DONE:
                raise SqliteReadError(
                    f"{self.path}: {sqlite3_errmsg(self.db).decode(errors='replace')}"
                )
            try:
                return self._tuples(count) if shape is None else self._records(count, shape)
            except UnicodeDecodeError as e:
                raise SqliteReadError(f"{self.path}: a text value is not UTF-8: {e}") from e
            finally:
                self._trim()
        finally:
            self.busy = False

    cdef int _step_all(self, Py_ssize_t *count, Py_ssize_t *used) noexcept nogil:
        """Steps to the end, copying each value; SQLITE_DONE, SQLite's error code, or -1."""
        cdef int rc, col, kind
        cdef Py_ssize_t n = 0, size
        cdef Value *v
        cdef const void *data
        while True:
            rc = sqlite3_step(self.stmt)
            if rc != SQLITE_ROW:
                count[0] = n // self.columns if self.columns else 0
                return rc
            if n + self.columns > self.values_cap:
                if self._grow_values(n + self.columns) < 0:
                    return -1
            for col in range(self.columns):
                v = &self.values[n]
                n += 1
                kind = sqlite3_column_type(self.stmt, col)
                v.kind = kind
                if kind == SQLITE_INTEGER:
                    v.i = sqlite3_column_int64(self.stmt, col)
                elif kind == SQLITE_FLOAT:
                    v.f = sqlite3_column_double(self.stmt, col)
                elif kind == SQLITE_TEXT or kind == SQLITE_BLOB:
                    # The pointer first, then its size: that order is SQLite's rule.
                    if kind == SQLITE_TEXT:
                        data = sqlite3_column_text(self.stmt, col)
                    else:
                        data = sqlite3_column_blob(self.stmt, col)
                    if data == NULL and sqlite3_errcode(self.db) == SQLITE_NOMEM:
                        return -1
                    size = sqlite3_column_bytes(self.stmt, col)
                    if used[0] + size > self.arena_cap:
                        if self._grow_arena(used[0] + size) < 0:
                            return -1
                    if size:
                        memcpy(self.arena + used[0], data, size)
                    v.i = used[0]
                    v.size = size
                    used[0] += size

    cdef int _grow_values(self, Py_ssize_t need) noexcept nogil:
        cdef Py_ssize_t cap = max(need, self.values_cap * 2, 1024)
        cdef Value *grown = <Value *>realloc(self.values, cap * sizeof(Value))
        if grown == NULL:
            return -1
        self.values, self.values_cap = grown, cap
        return 0

    cdef int _grow_arena(self, Py_ssize_t need) noexcept nogil:
        cdef Py_ssize_t cap = max(need, self.arena_cap * 2, 65536)
        cdef char *grown = <char *>realloc(self.arena, cap)
        if grown == NULL:
            return -1
        self.arena, self.arena_cap = grown, cap
        return 0

    cdef object _item(self, Value *v):
        if v.kind == SQLITE_INTEGER:
            return PyLong_FromLongLong(v.i)
        if v.kind == SQLITE_TEXT:
            return PyUnicode_DecodeUTF8(self.arena + v.i, v.size, "strict")
        if v.kind == SQLITE_BLOB:
            return PyBytes_FromStringAndSize(self.arena + v.i, v.size)
        if v.kind == SQLITE_FLOAT:
            return PyFloat_FromDouble(v.f)
        return None

    cdef list _tuples(self, Py_ssize_t count):
        cdef list out = []
        cdef Py_ssize_t r, n = 0
        cdef int col
        cdef object item
        cdef tuple row
        for r in range(count):
            if r and r % 1024 == 0:
                with nogil:
                    pass  # a thread waiting for the GIL gets it here
            row = PyTuple_New(self.columns)
            for col in range(self.columns):
                item = self._item(&self.values[n])
                n += 1
                Py_INCREF(item)  # PyTuple_SET_ITEM steals a reference
                PyTuple_SET_ITEM(row, col, item)
            out.append(row)
        return out

    cdef list _records(self, Py_ssize_t count, RecordShape shape):
        cdef list out = []
        untrack_container(out)  # of untracked records only (records.untrack_list)
        cdef list previous = [None] * self.columns  # each column's object in the row before
        cdef Py_ssize_t r, n = 0
        cdef int col
        cdef Value *v
        cdef Value *above
        cdef object item, record, before = None
        for r in range(count):
            if r and r % 1024 == 0:
                with nogil:
                    pass  # a thread waiting for the GIL gets it here
            record = shape.new_instance()
            out.append(record)  # owned by the list at once: freed with it if a put fails
            for col in range(self.columns):
                v = &self.values[n]
                above = v - self.columns
                if r and v.kind == above.kind and (
                        (v.kind == SQLITE_INTEGER and above.i == v.i)
                        or (v.kind == SQLITE_TEXT and above.size == v.size
                            and memcmp(self.arena + above.i, self.arena + v.i, v.size) == 0)):
                    item = previous[col]
                elif col and v.kind == SQLITE_INTEGER and (v - 1).kind == SQLITE_INTEGER and (v - 1).i == v.i:
                    item = before  # e.g. a task's due time and its fire time, the same number
                    previous[col] = item
                else:
                    item = self._item(v)
                    previous[col] = item
                before = item
                n += 1
                shape.put(record, col, item)
        return out

    cdef void _trim(self) noexcept:
        # A slice's worth of buffer is kept for the next read; a burst's is given back.
        if self.arena_cap > (64 << 20):
            free(self.arena)
            self.arena, self.arena_cap = NULL, 0
        if self.values_cap > (4 << 20):
            free(self.values)
            self.values, self.values_cap = NULL, 0
