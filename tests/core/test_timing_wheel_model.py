"""The compiled wheel behaves exactly like the reference model under random operations."""
import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from taskwheel.core import TimingWheel
from taskwheel.core.wheel import _set_move_min
from taskwheel.core.reference import INT64_MAX, INT64_MIN, ReferenceWheel

HOUR_MS = 3_600_000

# A small pool makes moves, cancels of pending keys and reuse after firing common.
keys = st.one_of(st.integers(0, 40), st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, INT64_MAX]))

# How far from the wheel time a deadline lies: in the past, in the current slot, across each
# level's boundary, hours and days away, and at the ends of int64.
offsets = st.one_of(
    st.integers(-300, 300),
    st.integers(-70_000, 70_000),
    st.integers(-20 * HOUR_MS, 20 * HOUR_MS),
    st.integers(-(1 << 40), 1 << 40),
    st.sampled_from([0, 1, 255, 256, 257, 65_535, 65_536, 65_537]),
)
extreme_deadlines = st.sampled_from([INT64_MIN, INT64_MIN + 1, INT64_MAX - 1, INT64_MAX])
steps = st.one_of(
    st.integers(0, 3),
    st.integers(0, 600),
    st.integers(0, 140_000),
    st.integers(0, 30 * HOUR_MS),
    st.integers(0, 1 << 45),
)
starts = st.one_of(
    st.just(1_700_000_000_000),
    st.integers(-(1 << 50), 1 << 50),
    st.sampled_from([INT64_MIN, -1, 0, INT64_MAX - HOUR_MS]),
)


def clamp(value: int) -> int:
    return max(INT64_MIN, min(INT64_MAX, value))


class WheelAgreesWithReference(RuleBasedStateMachine):
    @initialize(tick_ms=st.sampled_from([1, 1, 1, 3, 64, 1_000]), start_ms=starts)
    def start(self, tick_ms, start_ms):
        self.wheel = TimingWheel(tick_ms=tick_ms, start_ms=start_ms)
        self.model = ReferenceWheel(tick_ms=tick_ms, start_ms=start_ms)

    def deadline(self, data_offset):
        return clamp(self.model.now_ms + data_offset)

    @rule(key=keys, offset=offsets)
    def schedule(self, key, offset):
        deadline = self.deadline(offset)
        self.wheel.schedule(key, deadline)
        self.model.schedule(key, deadline)

    @rule(key=keys, deadline=extreme_deadlines)
    def schedule_at_an_extreme(self, key, deadline):
        self.wheel.schedule(key, deadline)
        self.model.schedule(key, deadline)

    @rule(pairs=st.lists(st.tuples(keys, offsets), max_size=80))
    def schedule_many(self, pairs):
        ks = array("q", [k for k, _ in pairs])
        ds = array("q", [self.deadline(o) for _, o in pairs])
        self.wheel.schedule_many(ks, ds)
        self.model.schedule_many(ks, ds)

    @rule(key=keys)
    def cancel(self, key):
        assert self.wheel.cancel(key) == self.model.cancel(key)

    @rule(ks=st.lists(keys, max_size=30))
    def cancel_many(self, ks):
        assert self.wheel.cancel_many(array("q", ks)) == self.model.cancel_many(array("q", ks))

    @rule(step=steps)
    def advance(self, step):
        now = clamp(self.model.now_ms + step)
        assert self.wheel.advance(now).tolist() == self.model.advance(now).tolist()

    @rule(back=st.integers(1, 100_000))
    def advance_to_an_earlier_time(self, back):
        now = clamp(self.model.now_ms - back)
        assert self.wheel.advance(now).tolist() == self.model.advance(now).tolist()

    @precondition(lambda self: self.model.now_ms < INT64_MAX)
    @rule()
    def advance_to_the_next_deadline(self):
        nd = self.model.next_deadline()
        if nd is not None:
            assert self.wheel.advance(nd).tolist() == self.model.advance(nd).tolist()

    @rule()
    def advance_to_the_end_of_time(self):
        assert self.wheel.advance(INT64_MAX).tolist() == self.model.advance(INT64_MAX).tolist()

    @invariant()
    def same_pending_keys(self):
        assert len(self.wheel) == len(self.model)
        assert self.wheel.now_ms == self.model.now_ms
        assert self.wheel.next_deadline() == self.model.next_deadline()
        for key in [*range(41), INT64_MIN, INT64_MIN + 1, -1, INT64_MAX]:
            assert (key in self.wheel) == (key in self.model)
            assert self.wheel.deadline_of(key) == self.model.deadline_of(key)

    @invariant()
    def structures_are_consistent(self):
        self.wheel.check_invariants()


WheelAgreesWithReference.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_wheel_agrees_with_reference = WheelAgreesWithReference.TestCase


@settings(max_examples=40, deadline=None)
@given(
    tick_ms=st.sampled_from([1, 5, 1_000]),
    deadlines=st.lists(st.integers(0, 140_000), min_size=1, max_size=3_000),  # crosses 2 level-2 blocks
    step=st.sampled_from([1, 17, 1_000, 70_000, 300_000]),
)
def test_every_key_fires_once_in_deadline_then_schedule_order(tick_ms, deadlines, step):
    wheel = TimingWheel(tick_ms=tick_ms, start_ms=0)
    wheel.schedule_many(array("q", range(len(deadlines))), array("q", deadlines))
    out = []
    for now in range(0, max(deadlines) + step, step):
        out.extend(wheel.advance(now))
    assert out == sorted(range(len(deadlines)), key=lambda k: (deadlines[k], k))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5_000),
    cancelled=st.data(),
)
def test_cancelled_and_moved_keys_leave_no_trace(n, cancelled):
    wheel = TimingWheel(tick_ms=1, start_ms=0)
    wheel.schedule_many(array("q", range(n)), array("q", [(k * 7919) % 100_000 + 1 for k in range(n)]))
    gone = cancelled.draw(st.sets(st.integers(0, n - 1)))
    moved = cancelled.draw(st.sets(st.integers(0, n - 1)))
    wheel.cancel_many(array("q", sorted(gone)))
    for key in sorted(moved - gone):
        wheel.schedule(key, 200_000 + key)
    wheel.check_invariants()
    out = wheel.advance(INT64_MAX).tolist()
    assert sorted(out) == sorted(set(range(n)) - gone)
    assert out[len(out) - len(moved - gone):] == sorted(moved - gone)


class GrowingAFewBucketsAtATime(WheelAgreesWithReference):
    """The same rules with every table growing incrementally (the wheel's own threshold is
    65,536 buckets, which the small key pool above never reaches): lookups, moves, cancels
    and fires while an old table is being emptied into the new one."""

    @initialize(tick_ms=st.sampled_from([1, 1, 1, 3, 64, 1_000]), start_ms=starts)
    def start(self, tick_ms, start_ms):
        _set_move_min(16)
        super().start(tick_ms, start_ms)

    def teardown(self):
        _set_move_min(65_536)


GrowingAFewBucketsAtATime.TestCase.settings = WheelAgreesWithReference.TestCase.settings
test_wheel_growing_incrementally_agrees_with_reference = GrowingAFewBucketsAtATime.TestCase


def test_a_large_wheel_grows_a_few_buckets_a_call_and_loses_nothing():
    """Past 65,536 buckets the table doubles a few buckets a call: schedules, moves, cancels
    and fires in the middle of each move still agree with a plain dict, in firing order too."""
    rng = random.Random(7)
    wheel = TimingWheel(tick_ms=1, start_ms=0)
    expected: dict[int, tuple[int, int]] = {}  # key -> (deadline, schedule call): the firing order
    calls = 0
    now = 0
    checked_while_growing = 0

    def schedule(key, deadline):
        nonlocal calls
        calls += 1
        wheel.schedule(key, deadline)
        expected[key] = (deadline, calls)

    for key in range(260_000):  # tables of 65,536 -> 131,072 -> 262,144 -> 524,288 buckets
        before = wheel.memory_bytes()
        schedule(key, now + rng.randrange(1, 600_000))
        other = rng.randrange(key + 1)
        if key % 5 == 0 and other in expected:  # a move, often of a key still in the old table
            schedule(other, now + rng.randrange(1, 600_000))
        if key % 7 == 0:
            gone = rng.randrange(key + 1)
            assert wheel.cancel(gone) == (expected.pop(gone, None) is not None)
        if key % 1_000 == 0:
            now += 50
            due = sorted((order, k) for k, order in expected.items() if order[0] <= now)
            assert wheel.advance(now).tolist() == [k for _, k in due]
            for _, k in due:
                del expected[k]
        if wheel.memory_bytes() - before > 256 * 1024:  # a new table: check in the middle of its move
            checked_while_growing += 1
            wheel.check_invariants()
            assert all(wheel.deadline_of(k) == d for k, (d, _) in list(expected.items())[:2_000])
    assert checked_while_growing >= 3
    wheel.check_invariants()
    assert len(wheel) == len(expected)
    assert all(wheel.deadline_of(k) == d for k, (d, _) in expected.items())
    assert wheel.advance(INT64_MAX).tolist() == [k for _, k in sorted((o, k) for k, o in expected.items())]
    assert len(wheel) == 0


def key_hashing_to(h):
    """The int64 key whose hash in the compiled key table is h: SplitMix64's finalizer inverted."""
    def unshift(z, s):  # undoes z ^= z >> s
        x = z
        for _ in range(64 // s + 1):
            x = z ^ (x >> s)
        return x
    z = unshift(h, 31) * pow(0x94D049BB133111EB, -1, 1 << 64) % (1 << 64)
    z = unshift(z, 27) * pow(0xBF58476D1CE4E5B9, -1, 1 << 64) % (1 << 64)
    z = unshift(z, 30)
    return z - (1 << 64) if z >> 63 else z


def test_key_hashing_to_inverts_the_tables_hash():
    def mix(key):
        z = key % (1 << 64)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % (1 << 64)
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % (1 << 64)
        return z ^ (z >> 31)
    assert mix(key_hashing_to(0)) == 0
    for h in (1, 4096, 0xDEADBEEF << 12, (1 << 64) - 1):
        assert mix(key_hashing_to(h)) == h


@pytest.mark.parametrize("move_min", [65_536, 16], ids=["doubling-whole", "doubling-incrementally"])
def test_keys_sharing_one_home_bucket_past_the_longest_probe_distance_all_fire(move_min):
    """300 keys whose hashes agree in their low 12 bits (and tags) share one home bucket in every
    table up to 4096 buckets: from the 257th on a bucket cannot record its probe distance, so the
    table has to double until they spread out, and no key may be lost on the way."""
    keys = [key_hashing_to(i << 12) for i in range(300)]
    _set_move_min(move_min)
    try:
        wheel = TimingWheel(tick_ms=1, start_ms=0)
        model = ReferenceWheel(tick_ms=1, start_ms=0)
        for n, key in enumerate(keys):
            wheel.schedule(key, 1 + n % 7)
            model.schedule(key, 1 + n % 7)
            if n % 50 == 0:
                wheel.check_invariants()
        wheel.check_invariants()
        assert all(wheel.deadline_of(key) == 1 + n % 7 for n, key in enumerate(keys))
        assert wheel.cancel_many(array("q", keys[::3])) == model.cancel_many(array("q", keys[::3])) == 100
        wheel.schedule_many(array("q", keys[::3]), array("q", [9] * 100))
        model.schedule_many(array("q", keys[::3]), array("q", [9] * 100))
        wheel.check_invariants()
        assert wheel.advance(10).tolist() == model.advance(10).tolist()
        assert len(wheel) == 0
    finally:
        _set_move_min(65_536)
