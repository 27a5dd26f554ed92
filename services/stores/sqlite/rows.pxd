# cython: language_level=3
"""C-level declarations of sqlite_rows.pyx: the part of SQLite's C API it uses, the buffer a
read's values are copied into, and the reader's fields."""
from libc.stdint cimport int64_t

from taskwheel.core.records cimport RecordShape

cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3
    ctypedef struct sqlite3_stmt
    int SQLITE_OK, SQLITE_ROW, SQLITE_DONE
    int SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL
    int SQLITE_OPEN_READONLY, SQLITE_OPEN_NOMUTEX, SQLITE_OPEN_URI, SQLITE_NOMEM
    int sqlite3_open_v2(const char *filename, sqlite3 **db, int flags, const char *vfs)
    int sqlite3_close_v2(sqlite3 *db)
    int sqlite3_busy_timeout(sqlite3 *db, int ms)
    int sqlite3_exec(sqlite3 *db, const char *sql, void *callback, void *arg, char **errmsg)
    const char *sqlite3_errmsg(sqlite3 *db)
    int sqlite3_errcode(sqlite3 *db)
    int sqlite3_prepare_v2(sqlite3 *db, const char *sql, int nbyte, sqlite3_stmt **stmt,
                           const char **tail)
    int sqlite3_finalize(sqlite3_stmt *stmt)
    int sqlite3_reset(sqlite3_stmt *stmt)
    int sqlite3_bind_parameter_count(sqlite3_stmt *stmt)
    int sqlite3_bind_int64(sqlite3_stmt *stmt, int index, long long value)
    int sqlite3_step(sqlite3_stmt *stmt)
    int sqlite3_column_count(sqlite3_stmt *stmt)
    int sqlite3_column_type(sqlite3_stmt *stmt, int col)
    long long sqlite3_column_int64(sqlite3_stmt *stmt, int col)
    double sqlite3_column_double(sqlite3_stmt *stmt, int col)
    const void *sqlite3_column_blob(sqlite3_stmt *stmt, int col)
    const unsigned char *sqlite3_column_text(sqlite3_stmt *stmt, int col)
    int sqlite3_column_bytes(sqlite3_stmt *stmt, int col)


cdef struct Value:
    int kind  # SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB or SQLITE_NULL
    int64_t i  # the integer, or the offset of a text's or blob's bytes in the arena
    double f
    Py_ssize_t size  # bytes of a text or blob


cdef class SqliteReader:
    cdef sqlite3 *db
    cdef sqlite3_stmt *stmt
    cdef int columns
    cdef int parameters
    cdef Value *values  # count * columns values, row after row
    cdef Py_ssize_t values_cap
    cdef char *arena  # the bytes of every text and blob of a read
    cdef Py_ssize_t arena_cap
    cdef readonly str path
    cdef bint busy  # stepping with the GIL released: no other call may touch the buffers

    cdef _fail(self, str what)
    cdef void _close(self) noexcept
    cdef int _step_all(self, Py_ssize_t *count, Py_ssize_t *used) noexcept nogil
    cdef int _grow_values(self, Py_ssize_t need) noexcept nogil
    cdef int _grow_arena(self, Py_ssize_t need) noexcept nogil
    cdef list _read(self, tuple params, RecordShape shape)
    cdef object _item(self, Value *v)
    cdef list _tuples(self, Py_ssize_t count)
    cdef list _records(self, Py_ssize_t count, RecordShape shape)
    cdef void _trim(self) noexcept
