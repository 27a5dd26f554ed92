"""untrack takes objects of one exact type out of the cyclic GC's view, and nothing else;
RecordShape builds records from column values as their constructor would, untracked."""
import dataclasses
import gc
import json
import sys

import pytest

from taskwheel.core import RecordShape, untrack, untrack_list
from taskwheel.core.reference import ReferenceRecordShape
from taskwheel.task import FIRING, TaskRecord, TaskState


def record(i: int = 0) -> TaskRecord:
    return TaskRecord(f"t{i}", 0, "q", b"p", 1, 1, headers={"k": "v"})


def test_records_are_untracked_and_counted():
    records = [record(i) for i in range(3)]
    assert all(gc.is_tracked(r) for r in records)
    assert untrack(records, TaskRecord) == 3
    assert not any(gc.is_tracked(r) for r in records)
    assert untrack(records, TaskRecord) == 0  # already untracked


def test_objects_of_other_types_stay_tracked():
    class Subclass(TaskRecord):
        pass

    others = [[1], {"a": []}, Subclass("t", 0, "q", b"", 1, 1)]
    assert untrack(others, TaskRecord) == 0
    assert all(gc.is_tracked(o) for o in others)


def test_a_list_of_untracked_objects_and_atoms_is_untracked_and_one_holding_a_tracked_object_is_not():
    records = [record(i) for i in range(3)]
    untrack(records, TaskRecord)
    held = records + ["task-id", 7]
    assert untrack_list(held) and not gc.is_tracked(held)
    mixed = [records[0], [1]]
    assert not untrack_list(mixed) and gc.is_tracked(mixed)
    with_dict = [{}]  # untracked while empty, tracked again once it holds a tracked value
    assert not untrack_list(with_dict) and gc.is_tracked(with_dict)
    assert untrack_list([]) is True


def test_an_untracked_record_keeps_its_fields_and_is_freed_by_reference_counting():
    rec = record()
    untrack([rec], TaskRecord)
    assert (rec.task_id, rec.headers) == ("t0", {"k": "v"})
    headers = rec.headers
    assert sys.getrefcount(headers) == 3  # headers, rec.headers, the call's argument
    del rec
    assert sys.getrefcount(headers) == 2  # the record is gone, with its reference


# -- RecordShape: records built from column values without __init__ ----------------------------

# The stored fields; the firing's fields (owner_epoch, redelivered) start at their defaults.
FIELDS = [f.name for f in dataclasses.fields(TaskRecord) if f.name not in FIRING]
VALUES = ["t1", 3, "q", b"p", 10, 11, 1, 2, 5, 4, '{"k": "v"}', "idem", 30_000, "tp", 7, 8, "err"]


@pytest.fixture(params=[RecordShape, ReferenceRecordShape], ids=["compiled", "reference"])
def shape_cls(request):
    return request.param


def test_a_shape_builds_the_record_its_constructor_would(shape_cls):
    converters = [{1: TaskState.SCHEDULED} if f == "state" else json.loads if f == "headers" else None
                  for f in FIELDS]
    built = shape_cls(TaskRecord, FIELDS, converters, FIRING).build(VALUES)
    assert built == TaskRecord("t1", 3, "q", b"p", 10, 11, TaskState.SCHEDULED, 2, 5, 4, {"k": "v"},
                               "idem", 30_000, "tp", 7, 8, "err")
    assert type(built) is TaskRecord


def test_a_built_record_is_untracked_and_freed_by_reference_counting():
    shape = RecordShape(TaskRecord, FIELDS, None, FIRING)
    payload = b"a payload no other object shares" * 2
    values = list(VALUES)
    values[3] = payload
    before = sys.getrefcount(payload)
    built = shape.build(values)
    assert not gc.is_tracked(built)
    assert sys.getrefcount(payload) == before + 1
    del built
    assert sys.getrefcount(payload) == before


def test_an_unknown_value_for_a_dict_converter_raises_key_error(shape_cls):
    converters = [{1: TaskState.SCHEDULED} if f == "state" else None for f in FIELDS]
    values = list(VALUES)
    values[FIELDS.index("state")] = 99
    with pytest.raises(KeyError):
        shape_cls(TaskRecord, FIELDS, converters, FIRING).build(values)


def test_a_shape_must_name_every_slot_once(shape_cls):
    with pytest.raises(TypeError, match="each slot"):
        shape_cls(TaskRecord, FIELDS[:-1], None, FIRING)
    with pytest.raises(TypeError, match="each slot"):
        shape_cls(TaskRecord, FIELDS + ["task_id"], None, FIRING)
    with pytest.raises(TypeError, match="each slot"):
        shape_cls(TaskRecord, FIELDS)  # the firing's slots neither named nor defaulted


def test_slots_given_defaults_start_at_them_and_a_copy_keeps_what_they_became(shape_cls):
    shape = shape_cls(TaskRecord, FIELDS, None, {"owner_epoch": 0, "redelivered": False})
    built = shape.build(VALUES)
    assert (built.owner_epoch, built.redelivered) == (0, False)
    built.owner_epoch, built.redelivered = 7, True
    copied = shape.copy(built)
    assert (copied.owner_epoch, copied.redelivered, copied.task_id) == (7, True, "t1")


def test_a_class_that_builds_itself_is_refused(shape_cls):
    @dataclasses.dataclass(slots=True)
    class Checked:
        a: int

        def __post_init__(self):
            assert self.a >= 0

    class Plain:  # no slots: its attributes live in a dict
        pass

    with pytest.raises(TypeError, match="__post_init__"):
        shape_cls(Checked, ["a"])
    with pytest.raises(TypeError, match="each slot"):
        shape_cls(Plain, ["a"])


def test_converters_must_be_dicts_or_callables_one_per_field(shape_cls):
    with pytest.raises(TypeError, match="converter of task_id"):
        shape_cls(TaskRecord, FIELDS, [5] + [None] * (len(FIELDS) - 1), FIRING)
    with pytest.raises(ValueError, match="converters"):
        shape_cls(TaskRecord, FIELDS, [None], FIRING)
    with pytest.raises(ValueError, match="values"):
        shape_cls(TaskRecord, FIELDS, None, FIRING).build(VALUES[:3])
