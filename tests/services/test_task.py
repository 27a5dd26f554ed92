"""The task record is declared once (taskwheel.task); what is derived from it stays in step."""
import dataclasses
import gc
import re
from importlib import resources

from taskwheel.task import (COLUMNS, DUE_TASK_FIELDS, FIELDS, FIRING, TASK_RECORD_SLOTS, TaskRecord, TaskState,
                            accepted, successor)
from taskwheel.internal.v1 import timer_pb2
from taskwheel.wire import due_message, record_of_due


def full_record() -> TaskRecord:
    return TaskRecord(task_id="t", shard=3, queue="q", payload=b"p", fire_at_ms=10, due_ms=20,
                      state=TaskState.LEASED, attempt=2, max_attempts=5, gen=7, headers={"k": "v"},
                      idempotency_key="key", lease_ms=4_000, traceparent="00-ab-cd-01", created_ms=1,
                      updated_ms=2, last_error="boom", owner_epoch=9, redelivered=True)


def test_a_tasks_next_due_row_copies_every_field_it_does_not_change():
    rec = full_record()
    assert successor(rec, 8, 30, 3, TaskState.SCHEDULED, "again") == dataclasses.replace(
        rec, gen=8, due_ms=30, attempt=3, state=TaskState.SCHEDULED, last_error="again")


def test_a_next_due_row_is_a_new_record_out_of_the_gcs_view():
    rec = full_record()
    nxt = successor(rec, 8, 30, 3, TaskState.SCHEDULED, "")
    assert nxt is not rec and rec.gen == 7
    assert not gc.is_tracked(nxt)


def test_an_accepted_record_is_scheduled_at_its_first_gen_and_attempt():
    rec = accepted(1_000, "00-trace")
    assert (rec.state, rec.gen, rec.attempt) == (TaskState.SCHEDULED, 1, 1)
    assert rec.created_ms == rec.updated_ms == rec.due_ms == rec.fire_at_ms == 1_000
    assert rec.traceparent == "00-trace"


def test_the_slots_shape_names_every_field_in_declaration_order():
    assert TASK_RECORD_SLOTS.fields == FIELDS + tuple(FIRING) == tuple(f.name for f in dataclasses.fields(TaskRecord))
    assert set(COLUMNS) == set(FIELDS)
    assert FIRING == {"owner_epoch": 0, "redelivered": False}  # a firing's, never stored


def test_the_due_task_message_carries_exactly_the_fields_marked_for_it():
    assert set(DUE_TASK_FIELDS) == {f.name for f in timer_pb2.DueTask.DESCRIPTOR.fields}


def test_a_record_survives_the_trip_through_a_due_task():
    rec = full_record()
    back = record_of_due(timer_pb2.DueTask.FromString(due_message(rec).SerializeToString()), lambda _: 3)
    for name in FIELDS + tuple(FIRING):
        expected = getattr(rec, name) if name in DUE_TASK_FIELDS or name == "shard" else \
            getattr(TaskRecord(task_id="", shard=0, queue="", payload=b"", fire_at_ms=0, due_ms=0), name)
        assert getattr(back, name) == expected, name


def _table_columns(ddl: str, table: str) -> dict[str, str]:
    """Column -> type of ``CREATE TABLE ... table (...)`` in a schema file."""
    body = re.search(r"CREATE TABLE IF NOT EXISTS [\w$.]*\b%s \((.*?)\n\)" % table, ddl, re.S).group(1)
    columns = {}
    for line in body.splitlines():
        line = line.strip().rstrip(",")
        if line and not line.upper().startswith("PRIMARY KEY"):
            name, kind = line.split(None, 1)
            columns[name] = re.sub(r" (NOT NULL|UNIQUE|PRIMARY KEY)", "", kind).strip()
    return columns


def test_the_embedded_stores_task_table_holds_every_field_with_its_declared_type():
    ddl = resources.files("taskwheel.stores.sqlite").joinpath("schema.sql").read_text()
    assert _table_columns(ddl, "tasks") == {name: COLUMNS[name].sql for name in FIELDS}


def test_cassandras_task_and_due_tables_hold_every_field_with_its_declared_type():
    ddl = resources.files("taskwheel.stores.cassandra").joinpath("schema.cql").read_text()
    declared = {name: COLUMNS[name].cql for name in FIELDS}
    assert _table_columns(ddl, "tasks") == declared
    due = _table_columns(ddl, "due")
    assert due.pop("bucket") == "bigint"
    assert due == declared
