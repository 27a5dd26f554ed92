"""PendingTasks: the timer's records in a TimingWheel, by key and by task id; the same
behaviours against ReferencePendingTasks, and the two alike under random operations."""
import dataclasses
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskwheel.core import RecordShape, TimingWheel
from taskwheel.core.reference import ReferenceWheel
from taskwheel.timer.pending import PendingTasks
from taskwheel.timer.reference import ReferencePendingTasks


@dataclasses.dataclass(slots=True)
class Rec:
    task_id: str
    due_ms: int
    gen: int = 1


def slots_read(wheel):
    """The compiled table reading Rec's fields from their slots, as the timer has it read TaskRecord's."""
    return PendingTasks(wheel, RecordShape(Rec, [f.name for f in dataclasses.fields(Rec)]))


@pytest.fixture(params=[(PendingTasks, TimingWheel), (slots_read, TimingWheel),
                        (ReferencePendingTasks, ReferenceWheel)],
                ids=["compiled", "compiled-slots", "reference"])
def pending(request):
    pending_cls, wheel_cls = request.param
    return pending_cls(wheel_cls(1, 0))


@dataclasses.dataclass(slots=True)
class OtherRec:
    task_id: str
    due_ms: int
    gen: int = 1


def test_records_of_another_type_than_the_shape_s_are_read_by_getattr():
    pending = slots_read(TimingWheel(1, 0))
    held = OtherRec("t", 100)
    assert pending.admit([held, Rec("u", 50)]) == 50
    newer = Rec("t", 80, gen=2)
    assert pending.admit([newer]) == 80  # the held OtherRec's gen read by getattr
    assert [r.task_id for r in pending.fire(100)] == ["u", "t"]


def test_a_record_with_a_field_never_set_raises_attribute_error():
    with pytest.raises(AttributeError, match="task_id"):
        slots_read(TimingWheel(1, 0)).admit([Rec.__new__(Rec)])


def test_records_fire_in_deadline_order_and_are_no_longer_held(pending):
    records = [Rec("c", 30), Rec("a", 10), Rec("b", 20)]
    assert pending.admit(records) == 10
    assert (len(pending), "a" in pending) == (3, True)
    assert [r.task_id for r in pending.fire(25)] == ["a", "b"]
    assert (len(pending), pending.get("a"), pending.get("c")) == (1, None, records[0])
    assert pending.fire(25) == []
    assert pending.fire(30) == [records[0]]
    assert len(pending) == len(pending.wheel) == 0


def test_a_newer_gen_moves_a_held_task_and_an_older_or_equal_one_is_ignored(pending):
    pending.admit([Rec("t", 100, gen=2)])
    assert pending.admit([Rec("t", 50, gen=2), Rec("t", 40, gen=1)]) is None
    moved = Rec("t", 200, gen=3)
    assert pending.admit([moved]) == 200
    assert pending.fire(150) == []
    assert pending.fire(200) == [moved]  # once: the move did not leave the old deadline behind


def test_records_named_in_skip_are_not_admitted(pending):
    assert pending.admit([Rec("keep", 5), Rec("drop", 5)], skip={"drop"}) == 5
    assert [r.task_id for r in pending.fire(5)] == ["keep"]


def test_forgotten_tasks_never_fire_and_unknown_names_are_ignored(pending):
    pending.admit([Rec(f"t{i}", 10 + i) for i in range(5)])
    assert pending.forget(["t1", "t3", "nobody", "t1"]) == 2
    assert sorted(r.task_id for r in pending.records()) == ["t0", "t2", "t4"]
    assert [r.task_id for r in pending.fire(100)] == ["t0", "t2", "t4"]
    assert pending.forget([]) == 0


def test_a_task_fired_and_admitted_again_fires_again(pending):
    pending.admit([Rec("t", 10)])
    assert len(pending.fire(10)) == 1
    again = Rec("t", 20, gen=2)
    pending.admit([again])
    assert pending.fire(20) == [again]


def test_the_compiled_fire_returns_a_list_out_of_the_gcs_view_unless_a_record_in_it_is_tracked():
    import gc

    from taskwheel.core import untrack

    pending = slots_read(TimingWheel(1, 0))
    untracked = [Rec("a", 5), Rec("b", 6)]
    untrack(untracked, Rec)
    pending.admit(untracked + [Rec("c", 9)])
    first = pending.fire(6)
    assert [r.task_id for r in first] == ["a", "b"] and not gc.is_tracked(first)
    second = pending.fire(9)  # "c" is an ordinary, tracked instance
    assert [r.task_id for r in second] == ["c"] and gc.is_tracked(second)


def test_a_wheel_with_keys_in_it_is_refused():
    wheel = TimingWheel(1, 0)
    wheel.schedule(1, 5)
    with pytest.raises(ValueError, match="empty"):
        PendingTasks(wheel)


ids = st.sampled_from([f"t{i}" for i in range(12)])
operations = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.lists(st.tuples(ids, st.integers(0, 400), st.integers(1, 4)), max_size=8),
              st.sets(ids, max_size=3)),
    st.tuples(st.just("fire"), st.integers(0, 120)),
    st.tuples(st.just("forget"), st.lists(ids, max_size=4)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_compiled_and_reference_agree_under_random_operations(ops):
    compiled, reference = PendingTasks(TimingWheel(1, 0)), ReferencePendingTasks(ReferenceWheel(1, 0))
    slots = slots_read(TimingWheel(1, 0))
    now = 0
    for op in ops:
        if op[0] == "admit":
            records = [Rec(task_id, now + due, gen) for task_id, due, gen in op[1]]
            admitted = compiled.admit(records, op[2])
            assert admitted == reference.admit(records, op[2]) == slots.admit(records, op[2])
        elif op[0] == "fire":
            now += op[1]
            assert compiled.fire(now) == reference.fire(now) == slots.fire(now)
        else:
            assert compiled.forget(op[1]) == reference.forget(op[1]) == slots.forget(op[1])
        assert len(compiled) == len(reference) == len(compiled.wheel) == len(slots)
        assert sorted(r.task_id for r in compiled.records()) == sorted(r.task_id for r in reference.records())


def test_the_compiled_table_holds_one_reference_per_record_and_drops_it_when_done():
    fired, forgotten, replaced, kept = Rec("f", 5), Rec("g", 50), Rec("r", 60), Rec("k", 70)

    def extra_references():
        return [sys.getrefcount(fired) - 2, sys.getrefcount(forgotten) - 2,
                sys.getrefcount(replaced) - 2, sys.getrefcount(kept) - 2]

    assert extra_references() == [0, 0, 0, 0]  # a name here and getrefcount's argument: 2
    pending = PendingTasks(TimingWheel(1, 0))
    pending.admit([fired, forgotten, replaced, kept])
    assert extra_references() == [1, 1, 1, 1]
    assert pending.fire(5) == [fired]
    pending.forget(["g"])
    pending.admit([Rec("r", 65, gen=2)])
    assert extra_references() == [0, 0, 0, 1]
    del pending
    assert extra_references() == [0, 0, 0, 0]


def test_cells_of_fired_tasks_are_reused_and_the_rest_stay_right(pending):
    for round_ in range(5):  # more tasks over time than are ever held at once
        now = round_ * 10_000
        soon = [Rec(f"s{round_}-{i}", now + 10 + i) for i in range(1500)]
        late = [Rec(f"l{round_}-{i}", 10**6 + i) for i in range(1500)]
        pending.admit(soon + late)
        assert pending.fire(now + 1509) == soon
        assert len(pending) == 1500 * (round_ + 1)
        assert pending.get(f"l{round_}-7") is late[7] and pending.get(f"s{round_}-7") is None
    assert sorted(r.task_id for r in pending.fire(2 * 10**6)) == sorted(
        f"l{j}-{i}" for j in range(5) for i in range(1500))
    assert len(pending) == 0
