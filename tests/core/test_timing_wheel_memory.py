"""The compiled wheel's footprint: at most 48 bytes per pending timer, all of it accounted for."""
import time
import tracemalloc

import numpy as np
import pytest

from taskwheel.core import TimingWheel

from .conftest import START_MS

N = 200_000


@pytest.fixture(scope="module")
def timers():
    rng = np.random.default_rng(3)
    return np.arange(N, dtype=np.int64), START_MS + rng.integers(1, 60_000, size=N)


def traced_growth(build):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def test_a_pending_timer_costs_at_most_48_bytes_when_scheduled_in_a_batch(timers):
    keys, deadlines = timers

    def build():
        wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
        wheel.schedule_many(keys, deadlines)
        return wheel

    grown, wheel = traced_growth(build)
    assert len(wheel) == N
    assert grown / N <= 48


def test_a_pending_timer_costs_at_most_48_bytes_when_scheduled_one_by_one(timers):
    pairs = list(zip(timers[0].tolist(), timers[1].tolist()))

    def build():
        wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
        for key, deadline in pairs:
            wheel.schedule(key, deadline)
        return wheel

    grown, wheel = traced_growth(build)
    assert len(wheel) == N
    assert grown / N <= 48


def test_memory_bytes_accounts_for_everything_the_wheel_allocates(timers):
    def build():
        wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
        wheel.schedule_many(*timers)
        return wheel

    grown, wheel = traced_growth(build)
    assert abs(wheel.memory_bytes() - grown) <= 0.01 * grown


def test_cancelling_every_timer_gives_the_memory_back(timers):
    wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
    wheel.schedule_many(*timers)
    full = wheel.memory_bytes()
    wheel.cancel_many(timers[0])
    assert wheel.memory_bytes() < 0.03 * full


def test_firing_every_timer_gives_the_memory_back(timers):
    wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
    wheel.schedule_many(*timers)
    full = wheel.memory_bytes()
    for now in range(START_MS, START_MS + 60_000, 100):
        wheel.advance(now)
    wheel.advance(START_MS + 60_000)
    assert len(wheel) == 0
    assert wheel.memory_bytes() < 0.03 * full


def test_rescheduling_one_key_forever_does_not_grow_the_wheel():
    wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
    wheel.schedule(1, START_MS + 30_000)
    settled = None
    for i in range(100_000):
        wheel.schedule(1, START_MS + 30_000 + i % 200)
        if i == 1_000:
            settled = wheel.memory_bytes()
    assert wheel.memory_bytes() == settled
    wheel.check_invariants()


def test_a_jump_across_the_whole_int64_range_costs_only_its_timers():
    wheel = TimingWheel(tick_ms=1, start_ms=-(1 << 63))
    rng = np.random.default_rng(5)
    deadlines = rng.integers(-(1 << 63), (1 << 63) - 1, size=10_000, dtype=np.int64)
    wheel.schedule_many(np.arange(10_000, dtype=np.int64), deadlines)
    started = time.perf_counter()
    out = wheel.advance((1 << 63) - 1)
    # Walking 2**64 ticks would never end; visiting occupied slots takes milliseconds.
    assert time.perf_counter() - started < 2.0
    assert len(out) == 10_000


def test_invariants_hold_after_a_mixed_workload(timers):
    keys, deadlines = timers
    wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
    wheel.schedule_many(keys, deadlines)
    wheel.cancel_many(keys[::3])
    wheel.schedule_many(keys[1::3], deadlines[1::3] + 90_000)
    for now in range(START_MS, START_MS + 70_000, 997):
        wheel.advance(now)
    wheel.check_invariants()


def test_stale_entries_never_outnumber_live_ones_once_there_are_many():
    wheel = TimingWheel(tick_ms=1, start_ms=START_MS)
    far = START_MS + 30_000
    wheel.schedule_many(np.arange(63, dtype=np.int64), np.full(63, far))
    wheel.cancel_many(np.arange(63, dtype=np.int64))
    wheel.schedule(100, far)  # 1 live entry beside at most 63 stale ones: allowed
    wheel.check_invariants()
    for key in range(1_000):
        wheel.schedule(key, far)
        wheel.cancel(key)
    wheel.check_invariants()
    assert wheel.memory_bytes() < TimingWheel(tick_ms=1, start_ms=START_MS).memory_bytes() + 64 * 1024
