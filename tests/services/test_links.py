"""RemoteTimer: offers and forgets reach another process's timer, retried while it is away."""
import asyncio
import logging
import time

import grpc
import grpc.aio
import pytest

from taskwheel import links
from taskwheel.links import RemoteTimer


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="timer restarting")


class FlakyTimerStub:
    """Stands in for the Timer stub: Forget fails with ``error`` ``failures`` times, then answers."""

    def __init__(self, failures: int, error: Exception | None = None):
        self.failures = failures
        self.error = error or unavailable()
        self.calls: list[tuple[float, dict]] = []

    async def Forget(self, request, **options):
        self.calls.append((time.monotonic(), options))
        if self.failures:
            self.failures -= 1
            raise self.error


async def forgotten_through(stub: FlakyTimerStub) -> RemoteTimer:
    """Sends one Forget through a RemoteTimer speaking to ``stub`` and waits for its retries."""
    remote = RemoteTimer("127.0.0.1:1", lookahead_ms=1_000)
    remote._stub = stub
    remote.forget(["t1"])
    await asyncio.gather(*remote._inflight, return_exceptions=True)
    return remote


async def test_a_forget_is_retried_with_doubling_waits_until_the_timer_takes_it(caplog):
    stub = FlakyTimerStub(failures=3)
    with caplog.at_level(logging.WARNING, logger="taskwheel.links"):
        await forgotten_through(stub)
    times = [at for at, _ in stub.calls]
    waits = [later - earlier for earlier, later in zip(times, times[1:])]
    assert len(stub.calls) == 4
    assert all(wait >= least - 0.001 for wait, least in zip(waits, (0.05, 0.1, 0.2))), waits
    assert all(options == {"timeout": 5, "wait_for_ready": True} for _, options in stub.calls)
    assert caplog.records == []


async def test_a_forget_still_failing_when_the_retry_time_is_up_is_dropped_with_a_warning(monkeypatch, caplog):
    # Waits of 50, 100, 200 and 400 ms fit in a second; the next, 800 ms, would not.
    monkeypatch.setattr(links, "_RETRY_FOR_S", 1.0)
    stub = FlakyTimerStub(failures=100)
    with caplog.at_level(logging.WARNING, logger="taskwheel.links"):
        await forgotten_through(stub)
    assert len(stub.calls) == 5
    assert [r.getMessage() for r in caplog.records] == [
        "giving up on ForgetRequest after 1s: timer restarting"]


async def test_an_error_that_is_not_grpcs_ends_the_forget_at_once():
    stub = FlakyTimerStub(failures=1, error=ValueError("a bug"))
    remote = RemoteTimer("127.0.0.1:1", lookahead_ms=1_000)
    remote._stub = stub
    remote.forget(["t1"])
    (task,) = remote._inflight
    with pytest.raises(ValueError):
        await task
    assert len(stub.calls) == 1


async def test_a_cancelled_forget_stops_retrying(caplog):
    stub = FlakyTimerStub(failures=100)
    remote = RemoteTimer("127.0.0.1:1", lookahead_ms=1_000)
    remote._stub = stub
    with caplog.at_level(logging.WARNING, logger="taskwheel.links"):
        remote.forget(["t1"])
        (task,) = remote._inflight
        while len(stub.calls) < 2:
            await asyncio.sleep(0.001)
        task.cancel()  # waiting 100 ms before the third attempt
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
    assert len(stub.calls) == 2
    assert caplog.records == []
