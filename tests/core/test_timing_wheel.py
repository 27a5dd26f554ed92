"""What a timing wheel promises, checked on the compiled wheel and on its reference model."""
from array import array

import numpy as np
import pytest

from taskwheel.core.reference import INT64_MAX, INT64_MIN

from .conftest import START_MS

HOUR_MS = 3_600_000


def fired(wheel, now_ms):
    return wheel.advance(now_ms).tolist()


def test_a_new_wheel_is_empty_and_stands_at_its_start_time(wheel):
    assert len(wheel) == 0
    assert wheel.next_deadline() is None
    assert wheel.now_ms == START_MS
    assert fired(wheel, START_MS + HOUR_MS) == []


def test_a_key_fires_when_the_wheel_reaches_its_deadline(wheel):
    wheel.schedule(7, START_MS + 250)
    assert fired(wheel, START_MS + 250) == [7]
    assert len(wheel) == 0


def test_a_key_never_fires_before_its_deadline(wheel):
    wheel.schedule(7, START_MS + 250)
    for now in range(START_MS, START_MS + 250):
        assert fired(wheel, now) == []
    assert 7 in wheel


def test_advance_moves_the_wheel_time(wheel):
    wheel.advance(START_MS + 42)
    assert wheel.now_ms == START_MS + 42


def test_advance_returns_an_int64_array(wheel):
    wheel.schedule(1, START_MS + 1)
    keys = wheel.advance(START_MS + 1)
    assert isinstance(keys, array) and keys.typecode == "q"


def test_fired_keys_are_ordered_by_deadline(wheel):
    deadlines = {1: 900, 2: 5, 3: 70_000, 4: 300, 5: 256}
    for key, offset in deadlines.items():
        wheel.schedule(key, START_MS + offset)
    assert fired(wheel, START_MS + 100_000) == [2, 5, 4, 1, 3]


def test_equal_deadlines_fire_in_the_order_they_were_scheduled(wheel):
    for key in [5, 3, 9, 1]:
        wheel.schedule(key, START_MS + 70_000)
    assert fired(wheel, START_MS + 70_000) == [5, 3, 9, 1]


def test_a_key_scheduled_early_for_a_far_deadline_fires_before_one_scheduled_later_for_it(wheel):
    # The first sits in an upper level and cascades down; the second lands in level 0 directly.
    wheel.schedule(1, START_MS + 70_000)
    wheel.advance(START_MS + 69_990)
    wheel.schedule(2, START_MS + 70_000)
    assert fired(wheel, START_MS + 70_000) == [1, 2]


def test_scheduling_a_pending_key_moves_it_later(wheel):
    wheel.schedule(1, START_MS + 10)
    wheel.schedule(1, START_MS + 500)
    assert len(wheel) == 1
    assert fired(wheel, START_MS + 499) == []
    assert fired(wheel, START_MS + 500) == [1]


def test_scheduling_a_pending_key_moves_it_earlier(wheel):
    wheel.schedule(1, START_MS + 2 * HOUR_MS)
    wheel.schedule(1, START_MS + 10)
    assert fired(wheel, START_MS + 10) == [1]
    assert fired(wheel, START_MS + 3 * HOUR_MS) == []


def test_a_moved_key_takes_its_place_after_keys_already_at_its_new_deadline(wheel):
    wheel.schedule(1, START_MS + 50)
    wheel.schedule(2, START_MS + 80)
    wheel.schedule(1, START_MS + 80)
    assert fired(wheel, START_MS + 80) == [2, 1]


def test_a_deadline_in_the_past_fires_at_the_next_advance(wheel):
    wheel.schedule(1, START_MS - 5_000)
    assert fired(wheel, START_MS) == [1]


def test_a_deadline_equal_to_the_wheel_time_fires_at_the_next_advance(wheel):
    wheel.advance(START_MS + 100)
    wheel.schedule(1, START_MS + 100)
    assert fired(wheel, START_MS + 100) == [1]


def test_overdue_keys_fire_by_deadline_and_before_keys_due_later(wheel):
    wheel.advance(START_MS + 1_000)
    wheel.schedule(1, START_MS + 1_001)
    wheel.schedule(2, START_MS + 900)
    wheel.schedule(3, START_MS + 100)
    wheel.schedule(4, START_MS + 900)
    assert fired(wheel, START_MS + 1_001) == [3, 2, 4, 1]


def test_advancing_to_a_time_before_the_wheel_time_fires_only_what_was_due_by_then(wheel):
    wheel.advance(START_MS + 1_000)
    wheel.schedule(1, START_MS + 900)
    wheel.schedule(2, START_MS + 500)
    wheel.schedule(3, START_MS + 2_000)
    assert fired(wheel, START_MS + 600) == [2]
    assert wheel.now_ms == START_MS + 1_000
    assert fired(wheel, START_MS + 1_000) == [1]


def test_cancel_reports_whether_the_key_was_pending(wheel):
    wheel.schedule(1, START_MS + 10)
    assert wheel.cancel(1) is True
    assert wheel.cancel(1) is False
    assert wheel.cancel(2) is False


def test_a_cancelled_key_never_fires(wheel):
    wheel.schedule(1, START_MS + 10)
    wheel.schedule(2, START_MS + 10)
    wheel.cancel(1)
    assert fired(wheel, START_MS + HOUR_MS) == [2]


def test_cancel_many_counts_the_keys_that_were_pending(wheel):
    wheel.schedule_many(array("q", [1, 2, 3]), array("q", [START_MS + 5] * 3))
    assert wheel.cancel_many(array("q", [2, 3, 4, 2])) == 2
    assert fired(wheel, START_MS + 5) == [1]


def test_a_key_can_be_scheduled_again_after_it_fired(wheel):
    wheel.schedule(1, START_MS + 10)
    wheel.advance(START_MS + 10)
    wheel.schedule(1, START_MS + 20)
    assert fired(wheel, START_MS + 20) == [1]


def test_a_jump_of_hours_fires_every_key_once_in_deadline_order(wheel):
    rng = np.random.default_rng(7)
    keys = np.arange(5_000, dtype=np.int64)
    deadlines = START_MS + rng.integers(1, 6 * HOUR_MS, size=keys.size)
    wheel.schedule_many(keys, deadlines)
    out = np.asarray(wheel.advance(START_MS + 6 * HOUR_MS))
    expected = keys[np.argsort(deadlines, kind="stable")]
    assert np.array_equal(out, expected)
    assert len(wheel) == 0


def test_stepping_one_millisecond_at_a_time_fires_each_key_at_its_deadline(wheel):
    rng = np.random.default_rng(11)
    deadlines = START_MS + rng.integers(1, 3_000, size=2_000)
    wheel.schedule_many(np.arange(2_000), deadlines)
    for now in range(START_MS + 1, START_MS + 3_000):
        for key in fired(wheel, now):
            assert deadlines[key] == now


def test_next_deadline_is_the_earliest_pending_deadline(wheel):
    wheel.schedule(1, START_MS + 900)
    wheel.schedule(2, START_MS + 2 * HOUR_MS)
    wheel.schedule(3, START_MS + 300)
    assert wheel.next_deadline() == START_MS + 300


def test_next_deadline_follows_cancels_and_moves_of_the_earliest_key(wheel):
    wheel.schedule(1, START_MS + 300)
    wheel.schedule(2, START_MS + 70_000)
    wheel.cancel(1)
    assert wheel.next_deadline() == START_MS + 70_000
    wheel.schedule(2, START_MS + 5 * HOUR_MS)
    assert wheel.next_deadline() == START_MS + 5 * HOUR_MS


def test_next_deadline_of_an_overdue_key_is_its_own_deadline(wheel):
    wheel.schedule(1, START_MS - 10)
    assert wheel.next_deadline() == START_MS - 10


def test_next_deadline_follows_advance(wheel):
    wheel.schedule(1, START_MS + 10)
    wheel.schedule(2, START_MS + 70_000)
    wheel.advance(START_MS + 10)
    assert wheel.next_deadline() == START_MS + 70_000


def test_deadline_of_and_membership_describe_pending_keys(wheel):
    wheel.schedule(1, START_MS + 10)
    assert wheel.deadline_of(1) == START_MS + 10
    assert 1 in wheel
    assert wheel.deadline_of(2) is None
    assert 2 not in wheel
    assert "1" not in wheel


def test_schedule_many_takes_arrays_numpy_memoryviews_and_lists(wheel):
    wheel.schedule_many(array("q", [1]), array("q", [START_MS + 1]))
    wheel.schedule_many(np.array([2], dtype=np.int64), np.array([START_MS + 2], dtype=np.int64))
    wheel.schedule_many(memoryview(array("q", [3])), memoryview(array("q", [START_MS + 3])))
    wheel.schedule_many([4], (START_MS + 4,))
    wheel.schedule_many(np.arange(10, 16, dtype=np.int64)[::2], np.full(3, START_MS + 5))
    assert fired(wheel, START_MS + 5) == [1, 2, 3, 4, 10, 12, 14]


def test_schedule_many_with_a_repeated_key_keeps_its_last_deadline(wheel):
    wheel.schedule_many([1, 2, 1], [START_MS + 10, START_MS + 20, START_MS + 30])
    assert wheel.deadline_of(1) == START_MS + 30
    assert fired(wheel, START_MS + 30) == [2, 1]


def test_schedule_many_of_nothing_changes_nothing(wheel):
    wheel.schedule_many(array("q"), array("q"))
    assert len(wheel) == 0


@pytest.mark.parametrize("key", [INT64_MIN, -1, 0, INT64_MAX])
def test_any_int64_is_a_key(wheel, key):
    wheel.schedule(key, START_MS + 1)
    assert key in wheel
    assert fired(wheel, START_MS + 1) == [key]


def test_deadlines_at_the_int64_extremes_fire(wheel):
    wheel.schedule(1, INT64_MAX)
    wheel.schedule(2, INT64_MIN)
    assert fired(wheel, START_MS) == [2]
    assert wheel.next_deadline() == INT64_MAX
    assert fired(wheel, INT64_MAX - 1) == []
    assert fired(wheel, INT64_MAX) == [1]
    assert wheel.now_ms == INT64_MAX


def test_a_wheel_starting_at_the_lowest_time_reaches_the_highest(wheel_cls):
    wheel = wheel_cls(tick_ms=1, start_ms=INT64_MIN)
    wheel.schedule_many([1, 2, 3], [0, INT64_MIN + 1, INT64_MAX])
    assert fired(wheel, INT64_MAX) == [2, 1, 3]


def test_negative_times_work_like_positive_ones(wheel_cls):
    wheel = wheel_cls(tick_ms=1, start_ms=-10_000)
    wheel.schedule_many([1, 2, 3], [-1, -9_000, 5])
    assert fired(wheel, -1) == [2, 1]
    assert fired(wheel, 5) == [3]


@pytest.mark.parametrize("tick_ms", [1, 7, 1_000])
def test_fires_are_exact_whatever_the_tick(wheel_cls, tick_ms):
    wheel = wheel_cls(tick_ms=tick_ms, start_ms=START_MS + 3)
    deadlines = [START_MS + 4, START_MS + 9, START_MS + 5, START_MS + 1_500, START_MS + 999]
    wheel.schedule_many(list(range(5)), deadlines)
    assert fired(wheel, START_MS + 5) == [0, 2]
    assert fired(wheel, START_MS + 998) == [1]
    assert fired(wheel, START_MS + 1_499) == [4]
    assert fired(wheel, START_MS + 1_500) == [3]


def test_tick_ms_must_be_positive(wheel_cls):
    with pytest.raises(ValueError, match="tick_ms"):
        wheel_cls(tick_ms=0, start_ms=0)
    with pytest.raises(ValueError, match="tick_ms"):
        wheel_cls(tick_ms=-5, start_ms=0)


@pytest.mark.parametrize("bad", [1.5, "7", None, b"7"])
def test_non_integers_are_type_errors(wheel, bad):
    with pytest.raises(TypeError):
        wheel.schedule(bad, START_MS)
    with pytest.raises(TypeError):
        wheel.schedule(1, bad)
    with pytest.raises(TypeError):
        wheel.cancel(bad)
    with pytest.raises(TypeError):
        wheel.advance(bad)
    with pytest.raises(TypeError):
        wheel.deadline_of(bad)


def test_a_float_tick_or_start_is_a_type_error(wheel_cls):
    with pytest.raises(TypeError):
        wheel_cls(tick_ms=1.0, start_ms=0)
    with pytest.raises(TypeError):
        wheel_cls(tick_ms=1, start_ms=0.5)


def test_numpy_integers_are_accepted_as_keys(wheel):
    wheel.schedule(np.int64(3), np.int64(START_MS + 1))
    assert np.int64(3) in wheel


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1])
def test_integers_outside_int64_are_overflow_errors(wheel, value):
    with pytest.raises(OverflowError):
        wheel.schedule(value, START_MS)
    with pytest.raises(OverflowError):
        wheel.schedule(1, value)
    assert value not in wheel


def test_schedule_many_rejects_buffers_of_different_lengths(wheel):
    with pytest.raises(ValueError, match="length"):
        wheel.schedule_many(array("q", [1, 2]), array("q", [START_MS]))
    assert len(wheel) == 0


@pytest.mark.parametrize("bad", [
    np.array([1], dtype=np.int32),
    np.array([1.0]),
    np.zeros((1, 1), dtype=np.int64),
    b"\x01",
    "1",
    7,
    [1.5],
])
def test_schedule_many_rejects_anything_but_int64s(wheel, bad):
    with pytest.raises(TypeError):
        wheel.schedule_many(bad, bad)
    assert len(wheel) == 0
