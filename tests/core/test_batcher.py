"""What the batcher promises, checked on the compiled batcher and on its reference model."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskwheel.core import Batcher, group_by
from taskwheel.core.reference import ReferenceBatcher


def test_items_wait_until_their_group_is_full(batcher_cls):
    batcher = batcher_cls(max_items=3, max_delay_ms=1_000)
    assert batcher.add("q", "a", 0) is None
    assert batcher.add("q", "b", 1) is None
    assert batcher.add("q", "c", 2) == ("q", ["a", "b", "c"])
    assert len(batcher) == 0


def test_partitions_of_any_hashable_kind_fill_separately(batcher_cls):
    batcher = batcher_cls(max_items=2, max_delay_ms=1_000)
    assert batcher.add((3, 28_333_333), 1, 0) is None
    assert batcher.add("emails", 2, 0) is None
    assert batcher.add(7, 3, 0) is None
    assert batcher.add((3, 28_333_333), 4, 0) == ((3, 28_333_333), [1, 4])
    assert batcher.groups == 2


def test_a_group_of_one_leaves_at_once(batcher_cls):
    batcher = batcher_cls(max_items=1, max_delay_ms=1_000)
    assert batcher.add("q", "a", 0) == ("q", ["a"])
    assert len(batcher) == 0 and batcher.next_flush_ms() is None


def test_a_group_is_due_once_its_oldest_item_is_max_delay_old(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=100)
    batcher.add("q", "a", 1_000)
    batcher.add("q", "b", 1_050)
    assert batcher.due(1_099) == []
    assert batcher.due(1_100) == [("q", ["a", "b"])]
    assert len(batcher) == 0


def test_due_returns_the_oldest_groups_first_and_keeps_the_young(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=100)
    batcher.add("b", 1, 20)
    batcher.add("a", 2, 10)
    batcher.add("c", 3, 90)
    batcher.add("b", 4, 95)
    assert batcher.due(125) == [("a", [2]), ("b", [1, 4])]
    assert len(batcher) == 1


def test_a_refilled_partition_ages_from_its_new_first_item(batcher_cls):
    batcher = batcher_cls(max_items=2, max_delay_ms=100)
    batcher.add("q", 1, 0)
    batcher.add("q", 2, 0)
    batcher.add("q", 3, 500)
    assert batcher.due(599) == []
    assert batcher.next_flush_ms() == 600


def test_next_flush_ms_is_when_the_oldest_group_falls_due(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=250)
    assert batcher.next_flush_ms() is None
    batcher.add("a", 1, 40)
    batcher.add("b", 1, 30)
    assert batcher.next_flush_ms() == 280


def test_drain_returns_every_group_oldest_first(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=250)
    batcher.add("a", 1, 40)
    batcher.add("b", 2, 30)
    batcher.add("a", 3, 50)
    assert batcher.drain() == [("b", [2]), ("a", [1, 3])]
    assert len(batcher) == 0 and batcher.groups == 0 and batcher.next_flush_ms() is None


def test_len_counts_waiting_items(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=250)
    batcher.add_many(["a", "b", "a"], [1, 2, 3], 0)
    assert len(batcher) == 3
    assert batcher.groups == 2


def test_add_many_returns_the_groups_that_filled_in_the_order_they_filled(batcher_cls):
    batcher = batcher_cls(max_items=2, max_delay_ms=250)
    full = batcher.add_many(["a", "b", "b", "c", "a", "a"], [1, 2, 3, 4, 5, 6], 0)
    assert full == [("b", [2, 3]), ("a", [1, 5])]
    assert batcher.drain() == [("c", [4]), ("a", [6])]


def test_a_clock_stepping_back_still_flushes_the_oldest_first(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=100)
    batcher.add("late", 1, 500)
    batcher.add("early", 2, 100)
    assert batcher.next_flush_ms() == 200
    assert batcher.due(250) == [("early", [2])]


def test_with_no_delay_every_group_is_due_at_once(batcher_cls):
    batcher = batcher_cls(max_items=10, max_delay_ms=0)
    batcher.add("q", 1, 5)
    assert batcher.due(5) == [("q", [1])]


def test_max_items_must_be_positive_and_max_delay_not_negative(batcher_cls):
    with pytest.raises(ValueError, match="max_items"):
        batcher_cls(max_items=0, max_delay_ms=10)
    with pytest.raises(ValueError, match="max_delay_ms"):
        batcher_cls(max_items=1, max_delay_ms=-1)


def test_add_many_rejects_sequences_of_different_lengths(batcher_cls):
    batcher = batcher_cls(max_items=2, max_delay_ms=250)
    with pytest.raises(ValueError, match="length"):
        batcher.add_many(["a", "b"], [1], 0)


def test_an_unhashable_partition_is_a_type_error(batcher_cls):
    batcher = batcher_cls(max_items=2, max_delay_ms=250)
    with pytest.raises(TypeError):
        batcher.add(["not", "hashable"], 1, 0)
    assert len(batcher) == 0


@pytest.mark.parametrize("bad", [1.5, "10", None])
def test_a_non_integer_time_is_a_type_error(bad):
    batcher = Batcher(max_items=2, max_delay_ms=250)
    with pytest.raises(TypeError):
        batcher.add("q", 1, bad)
    with pytest.raises(TypeError):
        batcher.due(bad)
    with pytest.raises(TypeError):
        Batcher(max_items=2, max_delay_ms=bad)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["a", "b", (1, 2), 3]), st.integers(-5, 400)),
        st.tuples(st.just("due"), st.just(None), st.integers(-5, 400)),
        st.tuples(st.just("drain"), st.just(None), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(max_items=st.integers(1, 5), max_delay_ms=st.integers(0, 150), ops=operations)
def test_batcher_agrees_with_reference(max_items, max_delay_ms, ops):
    batcher = Batcher(max_items, max_delay_ms)
    model = ReferenceBatcher(max_items, max_delay_ms)
    for n, (op, partition, now) in enumerate(ops):
        if op == "add":
            assert batcher.add(partition, n, now) == model.add(partition, n, now)
        elif op == "due":
            assert batcher.due(now) == model.due(now)
        else:
            assert batcher.drain() == model.drain()
        assert len(batcher) == len(model)
        assert batcher.groups == model.groups
        assert batcher.next_flush_ms() == model.next_flush_ms()


def test_group_by_collects_items_per_key_in_order():
    assert group_by([(1, 5), "q", (1, 5)], ["a", "b", "c"]) == {(1, 5): ["a", "c"], "q": ["b"]}
    assert list(group_by([3, 1, 3, 2], range(4))) == [3, 1, 2]


def test_group_by_rejects_sequences_of_different_lengths():
    with pytest.raises(ValueError, match="length"):
        group_by([1, 2], [1])
