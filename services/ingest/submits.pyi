from typing import Any

from taskwheel.core import RecordShape

def records_of_submit(raw: bytes, ids: Any, num_shards: int, now: int, limits: Any,
                      shape: RecordShape, scheduled: Any, traceparent: str = "") -> list[Any] | None:
    """The TaskRecords of a taskwheel.v1.SubmitRequest's wire bytes when every task is surely
    valid, else None: then read it with protobuf and ingest's validator, which word the errors."""

def encode_submit_results(task_ids: list[str], fire_ats: list[int], duplicates: list[bool]) -> bytes:
    """The bytes of one taskwheel.v1.SubmitResponse: per task its id and either
    duplicate = true or its fire_at."""
