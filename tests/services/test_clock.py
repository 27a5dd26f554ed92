"""The fake clock moves only when told, and wakes sleepers and timers in deadline order."""
import asyncio

import pytest

from taskwheel.clock import SYSTEM_CLOCK, FakeClock, now_ms


def test_the_system_clock_reads_the_wall_clock_in_milliseconds():
    before = now_ms()
    assert before <= SYSTEM_CLOCK.now_ms() <= now_ms()


async def test_a_fake_clock_stands_still_until_advanced():
    clock = FakeClock(1_000)
    await asyncio.sleep(0.01)
    assert clock.now_ms() == 1_000
    await clock.advance(250)
    assert clock.now_ms() == 1_250


async def test_sleepers_and_timers_wake_in_deadline_order_at_their_deadline():
    clock = FakeClock(0)
    woke = []

    async def sleeper(name, seconds):
        await clock.sleep(seconds)
        woke.append((name, clock.now_ms()))

    tasks = [asyncio.ensure_future(sleeper("late", 0.3)), asyncio.ensure_future(sleeper("early", 0.1))]
    clock.call_later(0.2, lambda tag: woke.append((tag, clock.now_ms())), "timer")
    await asyncio.sleep(0)
    await clock.advance(250)
    assert [name for name, _ in woke] == ["early", "timer"]
    await clock.advance(100)
    await asyncio.gather(*tasks)
    assert woke == [("early", 100), ("timer", 200), ("late", 300)]


async def test_a_cancelled_timer_never_fires_and_a_zero_sleep_only_yields():
    clock = FakeClock(0)
    fired = []
    clock.call_later(0.05, fired.append, "x").cancel()
    await clock.sleep(0)
    await clock.advance(100)
    assert fired == []


async def test_a_sleeper_woken_starts_its_next_sleep_at_the_time_it_woke():
    clock = FakeClock(0)
    ticks = []

    async def every_100ms():
        while True:
            await clock.sleep(0.1)
            ticks.append(clock.now_ms())

    loop_task = asyncio.ensure_future(every_100ms())
    await asyncio.sleep(0)
    await clock.advance(350)
    loop_task.cancel()
    assert ticks == [100, 200, 300]


async def test_run_until_gives_up_past_its_limit():
    clock = FakeClock(0)
    with pytest.raises(TimeoutError):
        await clock.run_until(lambda: False, limit_ms=50)
