"""The ``tasks`` table's columns, in TaskRecord's field order, and the conversions between a
record and its row."""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from taskwheel.core import RecordShape
from taskwheel.task import TaskRecord, TaskState

# Column order of the task SELECTs is TaskRecord's field order, so one function builds records.
TASK_COLUMNS = (
    "task_id, shard, queue, payload, fire_at_ms, due_ms, state, attempt, max_attempts, gen, "
    "headers, idempotency_key, lease_ms, traceparent, created_ms, updated_ms, last_error"
)

encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
decode_json = json.JSONDecoder().decode
STATES = {int(s): s for s in TaskState}


def encode_headers(headers: Mapping[str, str]) -> str:
    return encode_json(headers) if headers else ""


def decode_headers(text: str) -> dict[str, str]:
    return decode_json(text) if text else {}


# A task's row, in TASK_COLUMNS order (TaskRecord's fields), as its record: built without
# TaskRecord's Python __init__ and out of the cyclic GC's view (core.RecordShape), by the
# compiled reader for load_due and by ``record`` for the other reads.
TASK_RECORD = RecordShape(
    TaskRecord, TASK_COLUMNS.split(", "),
    [STATES if name == "state" else decode_headers if name == "headers" else None
     for name in TASK_COLUMNS.split(", ")],
)
record: Callable[[Sequence[Any]], TaskRecord] = TASK_RECORD.build
