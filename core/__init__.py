"""taskwheel's compiled hot path: the timing wheel and the timer's pending tasks in it, the
batcher, where a task lives, dispatch's fired tasks and their leases, the wire form of the
deliveries dispatch sends and of Submit's requests and responses, task records kept out of the
cyclic GC's view and built from C, and the embedded store's reads stepped without the GIL.

Services import these names from here, never from the compiled modules themselves.
"""
import sqlite3  # noqa: F401  first, so that sqlite_rows binds to the SQLite Python loaded

from taskwheel.core.batcher import Batcher, group_by
from taskwheel.core.deliveries import encode_deliveries
from taskwheel.core.leases import FinishedGeneration, Fired, fill, settle_acks, take_fired
from taskwheel.core.pending import PendingTasks
from taskwheel.core.records import RecordShape, untrack, untrack_list
from taskwheel.core.sharding import BUCKET_MS, bucket_of, shard_of, shards_of
from taskwheel.core.sqlite_rows import SqliteReader, SqliteReadError, same_sqlite_as_python
from taskwheel.core.submits import encode_submit_results, records_of_submit
from taskwheel.core.wheel import DEBUG_BUILD, TimingWheel

__all__ = [
    "BUCKET_MS",
    "Batcher",
    "DEBUG_BUILD",
    "FinishedGeneration",
    "Fired",
    "PendingTasks",
    "RecordShape",
    "SqliteReadError",
    "SqliteReader",
    "TimingWheel",
    "bucket_of",
    "encode_deliveries",
    "encode_submit_results",
    "fill",
    "group_by",
    "shard_of",
    "records_of_submit",
    "same_sqlite_as_python",
    "settle_acks",
    "shards_of",
    "take_fired",
    "untrack",
    "untrack_list",
]
