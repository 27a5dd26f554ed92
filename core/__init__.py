"""taskwheel's compiled hot path shared by every service: the timing wheel, the batcher, where
a task lives (shard and bucket), and task records built from C and kept out of the cyclic GC's
view. The compiled loops that only one service runs sit in that service's folder (dispatch's
leases and deliveries, ingest's Submit reader, the timer's pending tasks, the embedded store's
row reader); they share this package's C declarations (records.pxd, protowire.pxd).

Services import these names from here, never from the compiled modules themselves.
"""
from taskwheel.core.batcher import Batcher, group_by
from taskwheel.core.records import RecordShape, untrack, untrack_list
from taskwheel.core.sharding import BUCKET_MS, bucket_of, shard_of, shards_of
from taskwheel.core.wheel import DEBUG_BUILD, TimingWheel

__all__ = [
    "BUCKET_MS",
    "Batcher",
    "DEBUG_BUILD",
    "RecordShape",
    "TimingWheel",
    "bucket_of",
    "group_by",
    "shard_of",
    "shards_of",
    "untrack",
    "untrack_list",
]
