"""The ``tasks`` table's columns: TaskRecord's fields (taskwheel.task), in their order, and the
conversions between a record and its row. Nothing here names a field but to convert it."""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from taskwheel.core import RecordShape
from taskwheel.task import COLUMNS, FIELDS, FIRING, TaskRecord, TaskState

TASK_COLUMNS = ", ".join(FIELDS)
# A new task is SCHEDULED at gen 1 whatever its record says: the INSERTs write these values
# themselves, and an insert row holds the other fields, in FIELDS order.
NEW_TASK_VALUES = {"state": int(TaskState.SCHEDULED), "gen": 1}
INSERTED_FIELDS = tuple(name for name in FIELDS if name not in NEW_TASK_VALUES)
# Blobs travel as hex in JSON.
BLOB_FIELDS = frozenset(name for name in FIELDS if COLUMNS[name].sql == "BLOB")

encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
decode_json = json.JSONDecoder().decode
STATES = {int(s): s for s in TaskState}


def encode_headers(headers: Mapping[str, str]) -> str:
    return encode_json(headers) if headers else ""


def decode_headers(text: str) -> dict[str, str]:
    return decode_json(text) if text else {}


def new_task_values(placeholders: Sequence[str] | None = None) -> str:
    """The VALUES of a new task's row, in FIELDS order: NEW_TASK_VALUES, and for the other
    fields ``placeholders`` in turn (by default "?" each)."""
    given = iter(placeholders or ["?"] * len(INSERTED_FIELDS))
    return ", ".join(str(NEW_TASK_VALUES[name]) if name in NEW_TASK_VALUES else next(given)
                     for name in FIELDS)


# The fields not stored as they are: how each is written (as TEXT, an empty value as "" without
# a call) and read back.
_WRITTEN_AS: dict[str, Callable[[Any], str]] = {"headers": encode_headers}
_READ_AS: dict[str, Any] = {"state": STATES, "headers": decode_headers}


def _insert_rows_function() -> Callable[[Sequence[TaskRecord]], list[tuple]]:
    """``insert_rows(tasks)``: each task's insert row, INSERTED_FIELDS in order. Generated from
    the field list, as dataclasses generates ``__init__``: it runs on the writer thread, which
    bounds the submit rate, and reads each field as directly as code written out by hand."""
    values = ", ".join(
        f'(write_{name}(t.{name}) if t.{name} else "")' if name in _WRITTEN_AS else f"t.{name}"
        for name in INSERTED_FIELDS
    )
    namespace: dict[str, Any] = {f"write_{name}": write for name, write in _WRITTEN_AS.items()}
    exec(f"def insert_rows(tasks):\n    return [({values},) for t in tasks]\n", namespace)
    return namespace["insert_rows"]


insert_rows = _insert_rows_function()

# A task's row, in FIELDS order, as its record: built without TaskRecord's Python __init__ and
# out of the cyclic GC's view (core.RecordShape), by the compiled reader for load_due and by
# ``record`` for the other reads. JSON_TASK_RECORD reads the rows of SELECT_DUE_JSON.
TASK_RECORD = RecordShape(TaskRecord, FIELDS, [_READ_AS.get(name) for name in FIELDS], FIRING)
JSON_TASK_RECORD = RecordShape(
    TaskRecord, FIELDS,
    [bytes.fromhex if name in BLOB_FIELDS else _READ_AS.get(name) for name in FIELDS], FIRING,
)
record: Callable[[Sequence[Any]], TaskRecord] = TASK_RECORD.build
