"""taskwheel's compiled hot path: the timing wheel, the batcher, and where a task lives.

Services import these names from here, never from the compiled modules themselves.
"""
from taskwheel.core.batcher import Batcher, group_by
from taskwheel.core.sharding import BUCKET_MS, bucket_of, shard_of, shards_of
from taskwheel.core.wheel import DEBUG_BUILD, TimingWheel

__all__ = [
    "BUCKET_MS",
    "Batcher",
    "DEBUG_BUILD",
    "TimingWheel",
    "bucket_of",
    "group_by",
    "shard_of",
    "shards_of",
]
