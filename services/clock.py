"""The clock every service reads: wall time in unix milliseconds (the unit of every due time,
checkpoint and lease in taskwheel) and waiting for it.

Services take a ``Clock`` and never read time or sleep otherwise, so that their tests can run on
a ``FakeClock``, whose time moves only when the test moves it (as Kafka's MockTime does): a
test of a 30-second lease then takes no 30 seconds. ``SYSTEM_CLOCK`` is the real one.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any, Callable, Protocol


def now_ms() -> int:
    """The wall clock in unix milliseconds."""
    return time.time_ns() // 1_000_000


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall time, unix milliseconds."""

    async def sleep(self, seconds: float) -> None:
        """Returns once ``seconds`` of this clock's time have passed (at least one turn of the
        event loop, even for 0)."""

    def call_later(self, seconds: float, callback: Callable[..., None], *args: Any) -> Cancellable:
        """Calls ``callback(*args)`` once ``seconds`` of this clock's time have passed."""


class SystemClock:
    """The wall clock, and asyncio's timers for waiting."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[..., None], *args: Any) -> Cancellable:
        return asyncio.get_running_loop().call_later(seconds, callback, *args)


SYSTEM_CLOCK = SystemClock()


class _Timer:
    __slots__ = ("callback", "args", "cancelled")

    def __init__(self, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that stands still until ``advance`` moves it, for tests.

    Sleepers and timers wake in deadline order as ``advance`` passes their deadlines, and the
    event loop runs between one deadline and the next, so what a woken task does (and the
    sleeps it starts) happens at the time it would have on the real clock.
    """

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms
        self._timers: list[tuple[int, int, _Timer]] = []
        self._order = itertools.count()

    def now_ms(self) -> int:
        return self._now_ms

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, lambda: woken.done() or woken.set_result(None))
        try:
            await woken
        finally:
            timer.cancel()

    def call_later(self, seconds: float, callback: Callable[..., None], *args: Any) -> Cancellable:
        timer = _Timer(callback, args)
        # Rounded up to whole milliseconds, as a real timer never fires early either.
        deadline = self._now_ms + max(0, -int(-seconds * 1000 // 1))
        heapq.heappush(self._timers, (deadline, next(self._order), timer))
        return timer

    async def advance(self, ms: int, *, turns: int = 20) -> None:
        """Moves the clock ``ms`` ahead, waking each sleeper and timer at its deadline and
        letting the event loop run ``turns`` times after each."""
        end = self._now_ms + ms
        while self._timers and self._timers[0][0] <= end:
            deadline, _, timer = heapq.heappop(self._timers)
            self._now_ms = max(self._now_ms, deadline)
            if not timer.cancelled:
                timer.callback(*timer.args)
                for _ in range(turns):
                    await asyncio.sleep(0)
        self._now_ms = max(self._now_ms, end)
        for _ in range(turns):
            await asyncio.sleep(0)

    def pass_time(self, ms: int) -> None:
        """Moves the clock ``ms`` ahead at once, as time passes while code holds the event loop
        (a CPU-bound call); sleepers and timers due meanwhile wake at the next ``advance``."""
        self._now_ms += ms

    async def run_for(self, ms: int, *, step_ms: int = 10) -> None:
        """Advances ``ms`` in steps of ``step_ms``, letting a real millisecond pass after each,
        for work that runs on other threads (a store's reads and writes)."""
        end = self._now_ms + ms
        while self._now_ms < end:
            await self.advance(min(step_ms, end - self._now_ms))
            await asyncio.sleep(0.001)

    async def run_until(self, condition: Callable[[], bool], *, step_ms: int = 10, limit_ms: int = 600_000,
                        real_timeout_s: float = 10.0) -> None:
        """Advances in steps of ``step_ms`` until ``condition()`` holds, a real millisecond
        passing after each step as in ``run_for``. Raises TimeoutError past ``limit_ms`` of
        this clock's time or ``real_timeout_s`` of real time."""
        start = self._now_ms
        give_up = time.monotonic() + real_timeout_s
        while not condition():
            if self._now_ms - start >= limit_ms or time.monotonic() > give_up:
                raise TimeoutError(f"not met after {self._now_ms - start} ms of fake time")
            await self.advance(step_ms)
            if not condition():
                await asyncio.sleep(0.001)
