"""Dispatch's per-task loops (take_fired, fill, settle_acks) and the Fired they pass around; the
same behaviours against the reference model, and the two alike under random inputs."""
import dataclasses
import gc
import types
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskwheel import core
from taskwheel.core import reference
from taskwheel.dispatch import leases
from taskwheel.dispatch import reference as dispatch_reference
from taskwheel.dispatch.leases import FinishedGeneration
from taskwheel.stores.base import Transition, TransitionKind

NOW = 1_700_000_000_000
SUCCEED = TransitionKind.SUCCEED

# The compiled loops twice: reading the records' fields by getattr, and from their slots
# (given a RecordShape of the records' type, as the servicer passes).
COMPILED = types.SimpleNamespace(Fired=leases.Fired, Tables=leases.DispatchState, Take=leases.Take,
                                 Shape=core.RecordShape, reads_slots=False)
COMPILED_SLOTS = types.SimpleNamespace(**{**vars(COMPILED), "reads_slots": True})
REFERENCE = types.SimpleNamespace(Fired=dispatch_reference.ReferenceFired,
                                  Tables=dispatch_reference.ReferenceDispatchState,
                                  Take=dispatch_reference.ReferenceTake,
                                  Shape=reference.ReferenceRecordShape, reads_slots=False)


@pytest.fixture(params=[COMPILED, COMPILED_SLOTS, REFERENCE], ids=["compiled", "compiled-slots", "reference"])
def impl(request):
    return request.param


@dataclasses.dataclass(slots=True)
class Rec:
    task_id: str
    gen: int = 1
    queue: str = "q"
    shard: int = 0
    due_ms: int = NOW - 5
    lease_ms: int = 30_000


class Batch:
    def __init__(self):
        self.done = 0

    def done_one(self):
        self.done += 1


class Queue:
    def __init__(self):
        self.ready = deque()


def remembered(entries=()):
    """A generation of the finished memory holding ``entries`` (task_id -> gen << 44 | ms)."""
    finished = FinishedGeneration()
    finished.update(dict(entries).items())
    return finished


class Consumer:
    def __init__(self):
        self.in_flight = {}


class State:
    """Dispatch's tables (a DispatchState) and one consumer, as the loops see them."""

    def __init__(self, impl, queues=("q",)):
        self.impl = impl
        shape = impl.Shape(Transition, [f.name for f in dataclasses.fields(Transition)])
        record = impl.Shape(Rec, [f.name for f in dataclasses.fields(Rec)]) if impl.reads_slots else None
        self.tables = impl.Tables([remembered()], shape, SUCCEED, record)
        self.tables.queues.update((name, Queue()) for name in queues)
        self.consumer = Consumer()
        self.unheld, self.touched, self.slow = [], set(), []
        self.stale = []

    leases = property(lambda self: self.tables.leases)
    waiting = property(lambda self: self.tables.waiting)
    queues = property(lambda self: self.tables.queues)
    in_flight = property(lambda self: self.consumer.in_flight)

    @property
    def finished(self):
        return self.tables.finished

    @finished.setter
    def finished(self, generations):
        self.tables.finished[:] = generations  # the memory changes its one list in place

    def take(self, records, batch=None, fired_at=NOW - 1):
        batch = batch or Batch()
        take = self.impl.Take(batch, NOW, fired_at)
        taken = self.tables.take_fired(records, take, lambda _, rec: self.slow.append(rec))
        self.unheld += take.unheld
        self.touched |= take.touched
        return taken, batch

    def fill(self, room, queue="q", shortest=60_000):
        return self.tables.fill(self.queues[queue], self.consumer, room, NOW, shortest)

    def elsewhere(self, delivery_id):
        self.stale.append(delivery_id)
        return None

    def ack(self, delivery_ids, traced=None, finished=None):
        finished = self.finished[0] if finished is None else finished
        return self.tables.settle_acks(self.consumer, delivery_ids, finished, NOW + 10, self.elsewhere, traced)


def test_a_new_task_waits_at_the_end_of_its_queue_and_is_due_a_hold(impl):
    s = State(impl)
    recs = [Rec("a"), Rec("b")]
    taken, batch = s.take(recs)
    assert taken == 2 and batch.done == 0 and s.slow == []
    ready = list(s.queues["q"].ready)
    assert [f.record for f in ready] == recs and s.waiting == {"a": ready[0], "b": ready[1]}
    assert (ready[0].batches, ready[0].since, ready[0].fired_at) == ([batch], NOW, NOW - 1)
    assert ready[1].batches is ready[0].batches  # one list for the take, never changed in place
    assert (ready[0].gen, ready[0].held_gen, ready[0].written, ready[0].delivery_id) == (0, 0, False, None)
    assert s.unheld == ["a", "b"] and s.touched == {s.queues["q"]}


def test_a_task_finished_at_its_gen_or_later_is_counted_done_and_not_taken(impl):
    s = State(impl)
    s.finished = [remembered({"new": 3 << 44 | NOW}),
                  remembered({"same": 2 << 44 | NOW, "new": 1 << 44 | NOW})]
    taken, batch = s.take([Rec("same", gen=2), Rec("new", gen=2)])
    assert (taken, batch.done, s.waiting, s.slow) == (0, 2, {}, [])


def test_a_task_finished_at_an_older_gen_is_taken(impl):
    s = State(impl)
    s.finished = [remembered({"t": 1 << 44 | NOW})]
    assert s.take([Rec("t", gen=2)])[0] == 1 and "t" in s.waiting


def test_a_leased_or_waiting_task_or_an_unknown_queue_goes_to_slow_in_its_place(impl):
    s = State(impl)
    s.leases["leased"] = impl.Fired(Rec("leased"), [], NOW, NOW)
    s.waiting["waiting"] = impl.Fired(Rec("waiting"), [], NOW, NOW)
    recs = [Rec("a"), Rec("leased"), Rec("b", queue="other"), Rec("waiting"), Rec("c")]
    order = []
    s.slow = types.SimpleNamespace(append=lambda rec: order.append(rec.task_id))
    s.queues["q"].ready = types.SimpleNamespace(append=lambda f: order.append(f.record.task_id))
    assert s.take(recs)[0] == 2
    assert order == ["a", "leased", "b", "waiting", "c"]


def test_queues_of_one_batch_each_get_their_tasks(impl):
    s = State(impl, queues=("x", "y"))
    s.take([Rec("1", queue="x"), Rec("2", queue="y"), Rec("3", queue="x"), Rec("4", queue="".join("y"))])
    assert [f.record.task_id for f in s.queues["x"].ready] == ["1", "3"]
    assert [f.record.task_id for f in s.queues["y"].ready] == ["2", "4"]
    assert s.touched == set(s.queues.values())


def test_fill_sends_up_to_room_as_leases_named_by_task_and_next_gen(impl):
    s = State(impl)
    s.take([Rec("a", gen=1, lease_ms=5_000), Rec("b", gen=7, lease_ms=100), Rec("c")])
    sent, shortest = s.fill(2)
    assert [f.delivery_id for f in sent] == ["a.2", "b.8"] and shortest == 100
    a, b = sent
    assert (a.gen, a.due_ms, a.consumer, b.due_ms) == (2, NOW + 5_000, s.consumer, NOW + 100)
    assert s.in_flight == {"a.2": a, "b.8": b} and s.leases == {"a": a, "b": b}
    assert list(s.waiting) == ["c"] and len(s.queues["q"].ready) == 1


def test_fill_drops_tasks_cancelled_or_superseded_while_they_waited(impl):
    s = State(impl)
    s.take([Rec("gone"), Rec("old"), Rec("kept")])
    del s.waiting["gone"]
    s.waiting["old"] = impl.Fired(Rec("old", gen=4), [], NOW, NOW)
    sent, shortest = s.fill(10, shortest=60_000)
    assert [f.delivery_id for f in sent] == ["kept.2"] and shortest == 30_000
    assert not s.queues["q"].ready and list(s.waiting) == ["old"]


def test_fill_with_no_room_sends_nothing(impl):
    s = State(impl)
    s.take([Rec("a")])
    assert s.fill(0) == ([], 60_000) and len(s.queues["q"].ready) == 1


def _sent(s, *recs):
    s.take(list(recs))
    return s.fill(len(recs))[0]


def test_the_compiled_loops_lists_of_leases_transitions_and_task_ids_are_out_of_the_gcs_view():
    s = State(COMPILED_SLOTS)
    s.take([Rec("t", gen=3), Rec("u", gen=1)])
    sent, _ = s.fill(2)
    transitions, confirm, forget, _ = s.ack(["t.4", "u.2"])
    assert len(sent) == 2 and len(transitions) == 2
    assert not gc.is_tracked(sent) and not gc.is_tracked(transitions) and not gc.is_tracked(forget)
    assert not any(gc.is_tracked(t) for t in transitions)


def test_an_ack_before_the_lease_is_written_ends_the_delivered_row_and_confirms_the_push(impl):
    s = State(impl)
    (lease,) = _sent(s, Rec("t", gen=3, shard=5, due_ms=NOW - 2))
    transitions, confirm, forget, coalesced = s.ack(["t.4"])
    assert transitions == [Transition("t", 5, SUCCEED, 3, NOW - 2)]
    assert (confirm, forget, coalesced, lease.written) == ([lease.batches], [], 1, True)
    assert s.in_flight == {} and s.leases == {} and s.finished[0].entries == {"t": 4 << 44 | NOW + 10}


def test_an_ack_after_the_lease_is_written_ends_the_lease_row_and_forgets_it_in_the_timer(impl):
    s = State(impl)
    (lease,) = _sent(s, Rec("t", gen=3))
    lease.written = True
    transitions, confirm, forget, coalesced = s.ack(["t.4"])
    assert transitions == [Transition("t", 0, SUCCEED, 4, NOW + 30_000)]
    assert (confirm, forget, coalesced) == ([], ["t"], 0)


def test_an_ack_of_a_held_task_before_its_lease_forgets_the_hold_row(impl):
    s = State(impl)
    (lease,) = _sent(s, Rec("t", gen=3))
    lease.held_gen = 3
    assert s.ack(["t.4"])[2] == ["t"]


def test_an_ack_not_in_flight_asks_elsewhere_and_a_stale_one_is_skipped(impl):
    s = State(impl)
    (lease,) = _sent(s, Rec("t"))
    other = impl.Fired(Rec("u"), [], NOW, NOW)
    other.gen, other.delivery_id = 2, "u.2"
    s.leases["u"] = other
    s.elsewhere = lambda delivery_id: other if delivery_id == "u.2" else None
    transitions, _, _, coalesced = s.ack(["nope.1", "u.2", "t.2"])
    assert [t.task_id for t in transitions] == ["u", "t"] and coalesced == 2 and s.leases == {}


def test_an_ack_leaves_a_newer_lease_of_the_task_alone(impl):
    s = State(impl)
    (lease,) = _sent(s, Rec("t"))
    newer = impl.Fired(Rec("t", gen=5), [], NOW, NOW)
    s.leases["t"] = newer
    assert len(s.ack(["t.2"])[0]) == 1 and s.leases == {"t": newer}


def test_answered_leases_are_given_to_traced_when_asked(impl):
    s = State(impl)
    sent = _sent(s, Rec("a"), Rec("b"))
    traced = []
    s.ack(["b.2", "a.2"], traced)
    assert traced == [sent[1], sent[0]]


def test_a_gen_past_the_c_range_is_still_remembered_exactly(impl):
    s = State(impl)
    (lease,) = _sent(s, Rec("t", gen=(1 << 40)))
    s.ack([lease.delivery_id])
    assert s.finished[0]["t"] == ((1 << 40) + 1) << 44 | NOW + 10


def test_the_tables_refuse_a_transition_shape_of_other_fields(impl):
    @dataclasses.dataclass(slots=True)
    class Other:
        task_id: str

    with pytest.raises(TypeError, match="RecordShape of the fields"):
        impl.Tables([remembered()], impl.Shape(Other, ["task_id"]), SUCCEED)


class OtherRec(Rec):
    """Rec's fields, but not exactly its type: read by getattr."""
    __slots__ = ()


def test_a_record_not_of_the_shape_s_type_is_read_by_getattr():
    s = State(COMPILED_SLOTS)
    taken, _ = s.take([OtherRec("a", gen=2, lease_ms=7), Rec("b")])
    sent, shortest = s.fill(2)
    assert taken == 2 and [f.delivery_id for f in sent] == ["a.3", "b.2"] and shortest == 7
    transitions, *_ = s.ack(["a.3"])
    assert [(t.task_id, t.shard, t.expected_gen) for t in transitions] == [("a", 0, 2)]


def test_a_record_with_a_field_never_set_raises_attribute_error():
    s = State(COMPILED_SLOTS)
    rec = Rec.__new__(Rec)  # no __init__: every slot empty
    with pytest.raises(AttributeError, match="task_id"):
        s.take([rec])


def test_fired_tasks_and_transitions_are_out_of_the_gcs_view():
    s = State(COMPILED)
    (lease,) = _sent(s, Rec("t"))
    transitions = s.ack(["t.2"])[0]
    assert not gc.is_tracked(lease) and not gc.is_tracked(transitions[0])


def test_a_task_finished_in_a_filtered_generation_is_counted_done_and_not_taken():
    s = State(COMPILED)
    crowded = FinishedGeneration(1_000)
    crowded.update((f"other{i}", 9 << 44) for i in range(5_000))  # past its capacity
    crowded["same"] = 2 << 44 | NOW
    s.finished = [FinishedGeneration(), crowded]
    taken, batch = s.take([Rec("same", gen=2), Rec("fresh")])
    assert (taken, batch.done, list(s.waiting)) == (1, 1, ["fresh"])


def test_an_ack_into_a_filtered_generation_is_remembered_there():
    s = State(COMPILED)
    (lease,) = _sent(s, Rec("t", gen=3))
    newest = FinishedGeneration()
    s.ack(["t.4"], finished=newest)
    assert newest.get("t") == 4 << 44 | NOW + 10
    assert "t" in newest and newest.may_hold("t")


@settings(max_examples=100, deadline=None)
@given(put=st.dictionaries(st.text(max_size=12), st.integers(1, 1 << 62), max_size=300),
       asked=st.lists(st.text(max_size=12), max_size=100), capacity=st.integers(0, 400))
def test_a_finished_generation_answers_as_its_dict_does(put, asked, capacity):
    generation = FinishedGeneration(capacity)
    generation.update(put.items())
    assert generation.entries == put and len(generation) == len(put) and sorted(generation) == sorted(put)
    for task_id in list(put) + asked:
        assert generation.get(task_id) == put.get(task_id)
        assert (task_id in generation) == (task_id in put)
        assert generation.may_hold(task_id) or task_id not in put  # no false negatives


def test_a_finished_generation_s_filter_turns_away_most_tasks_never_put():
    generation = FinishedGeneration(100_000)
    generation.update((f"done-{i}", 1) for i in range(100_000))
    held = sum(generation.may_hold(f"fresh-{i}") for i in range(100_000))
    assert held < 10_000  # ~5 % at capacity; each one only costs a dict lookup
    assert generation.bytes <= 128 * 1024


def test_a_finished_generation_drains_exactly_as_many_as_asked_until_empty():
    generation = FinishedGeneration()
    generation.update((f"t{i}", i) for i in range(1_000))
    taken = [generation.drain(300) for _ in range(5)]
    assert taken == [300, 300, 300, 100, 0] and len(generation) == 0 and generation.entries == {}
    assert all(generation.get(f"t{i}") is None for i in range(1_000))


@given(put=st.sets(st.text(max_size=12), max_size=300), most=st.integers(0, 400))
def test_what_a_finished_generation_drains_is_gone_and_the_rest_is_kept(put, most):
    generation = FinishedGeneration()
    generation.update((task_id, 1) for task_id in put)
    taken = generation.drain(most)
    kept = {task_id for task_id in put if task_id in generation}
    assert taken == min(most, len(put)) and len(kept) == len(put) - taken == len(generation)


# -- the two alike ----------------------------------------------------------------------------

_records = st.lists(st.builds(Rec, task_id=st.sampled_from("abcdefgh"), gen=st.integers(1, 4),
                              queue=st.sampled_from(["q", "r", "new"]), lease_ms=st.integers(1, 9)),
                    max_size=20)


def _view(s):
    """Everything the loops change, with Fired objects named by their fields."""
    def fired(f):
        return (f.record.task_id, f.record.gen, f.gen, f.delivery_id, f.due_ms, f.written, f.held_gen)
    return (sorted((k, fired(f)) for k, f in s.leases.items()),
            sorted((k, fired(f)) for k, f in s.waiting.items()),
            sorted((k, fired(f)) for k, f in s.in_flight.items()),
            {name: [fired(f) for f in q.ready] for name, q in s.queues.items()},
            [g.entries for g in s.finished], s.unheld,
            sorted(name for name, q in s.queues.items() if q in s.touched),
            [r.task_id for r in s.slow], s.stale)


@settings(max_examples=200, deadline=None)
@given(first=_records, second=_records, room=st.integers(0, 12),
       finished=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 4)),
       acks=st.lists(st.sampled_from([f"{t}.{g}" for t in "abcdefgh" for g in range(1, 6)])),
       written=st.sets(st.sampled_from("abcdefgh")))
def test_compiled_and_reference_loops_agree(first, second, finished, room, acks, written):
    results = []
    for impl in (COMPILED, COMPILED_SLOTS, REFERENCE):
        s = State(impl, queues=("q", "r"))
        s.finished = [remembered(), remembered({k: g << 44 | NOW for k, g in finished.items()})]
        taken = [s.take([dataclasses.replace(r) for r in first])[0]]
        sent = s.fill(room)
        for f in sent[0]:
            f.written = f.record.task_id in written
        taken.append(s.take([dataclasses.replace(r) for r in second])[0])
        sent2 = s.fill(room, queue="r")
        transitions, confirm, forget, coalesced = s.ack(acks, finished=remembered())
        results.append((taken, [f.delivery_id for f in sent[0] + sent2[0]], sent[1], sent2[1], transitions,
                        len(confirm), forget, coalesced, _view(s)))
    assert results[0] == results[1] == results[2]
