"""taskwheel's compiled hot path: the timing wheel, the batcher, where a task lives, the wire
form of the deliveries dispatch sends, and task records kept out of the cyclic GC's view.

Services import these names from here, never from the compiled modules themselves.
"""
from taskwheel.core.batcher import Batcher, group_by
from taskwheel.core.deliveries import encode_deliveries
from taskwheel.core.records import untrack
from taskwheel.core.sharding import BUCKET_MS, bucket_of, shard_of, shards_of
from taskwheel.core.wheel import DEBUG_BUILD, TimingWheel

__all__ = [
    "BUCKET_MS",
    "Batcher",
    "DEBUG_BUILD",
    "TimingWheel",
    "bucket_of",
    "encode_deliveries",
    "group_by",
    "shard_of",
    "shards_of",
    "untrack",
]
