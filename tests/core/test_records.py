"""untrack takes objects of one exact type out of the cyclic GC's view, and nothing else."""
import gc
import sys

from taskwheel.core import untrack
from taskwheel.stores.base import TaskRecord


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


def test_an_untracked_record_keeps_its_fields_and_is_freed_by_reference_counting():
    rec = record()
    untrack([rec], TaskRecord)
    assert (rec.task_id, rec.headers) == ("t0", {"k": "v"})
    headers = rec.headers
    assert sys.getrefcount(headers) == 3  # headers, rec.headers, the call's argument
    del rec
    assert sys.getrefcount(headers) == 2  # the record is gone, with its reference
