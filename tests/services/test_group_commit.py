"""Group commit: many callers, one store call; bounded, and failures reach every caller."""
import asyncio

import pytest

from taskwheel.group_commit import Backpressure, GroupCommit


async def test_callers_arriving_during_a_write_share_the_next_write():
    calls = []

    async def write(items):
        calls.append(list(items))
        await asyncio.sleep(0.02)
        return [i * 10 for i in items]

    gc = GroupCommit(write, max_batch=100, max_pending=1000)
    gc.start()
    first = gc.commit([1])
    await asyncio.sleep(0.005)  # the first write is running now
    rest = [gc.commit([i, i + 100]) for i in range(2, 6)]
    results = await asyncio.gather(first, *rest)
    await gc.stop()
    assert results == [[10], [20, 1020], [30, 1030], [40, 1040], [50, 1050]]
    assert calls == [[1], [2, 102, 3, 103, 4, 104, 5, 105]]


async def test_a_write_never_exceeds_max_batch_unless_one_caller_alone_does():
    sizes = []

    async def write(items):
        sizes.append(len(items))
        return list(items)

    gc = GroupCommit(write, max_batch=5, max_pending=1000)
    futs = [gc.commit([0, 0, 0]) for _ in range(4)] + [gc.commit([0] * 7)]
    gc.start()
    await asyncio.gather(*futs)
    await gc.stop()
    assert sizes == [3, 3, 3, 3, 7]


async def test_a_full_queue_refuses_at_once_with_a_retry_hint():
    async def write(items):
        await asyncio.sleep(0.05)
        return list(items)

    gc = GroupCommit(write, max_batch=10, max_pending=10)
    gc.start()
    first = gc.commit(list(range(8)))
    with pytest.raises(Backpressure) as err:
        gc.commit(list(range(5)))
    assert err.value.retry_after_ms >= 10
    await first
    await gc.stop()


async def test_a_store_failure_reaches_every_caller_of_that_write_and_later_writes_still_run():
    attempts = []

    async def write(items):
        attempts.append(len(items))
        if len(attempts) == 1:
            raise ConnectionError("store down")
        return list(items)

    gc = GroupCommit(write, max_batch=100, max_pending=100)
    a, b = gc.commit([1]), gc.commit([2])
    gc.start()
    for fut in (a, b):
        with pytest.raises(ConnectionError):
            await fut
    assert await gc.commit([3]) == [3]
    await gc.stop()


class OverlapCounter:
    """A store write that takes ``seconds`` and records how many writes ran at once."""

    def __init__(self, seconds: float, result=list):
        self.seconds, self.result = seconds, result
        self.running = 0
        self.peak = 0

    async def __call__(self, items):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(self.seconds)
        self.running -= 1
        return self.result(items)


async def test_with_concurrency_independent_writes_overlap_and_each_caller_gets_its_own_results():
    write = OverlapCounter(0.03, lambda items: [i + 1 for i in items])

    gc = GroupCommit(write, max_batch=2, max_pending=100, concurrency=3)
    futs = [gc.commit([i, i]) for i in range(6)]
    gc.start()
    results = await asyncio.gather(*futs)
    await gc.stop()
    assert results == [[i + 1, i + 1] for i in range(6)]
    assert write.peak == 3


async def test_with_concurrency_one_writes_never_overlap():
    write = OverlapCounter(0.01)

    gc = GroupCommit(write, max_batch=1, max_pending=100)
    futs = [gc.commit([i]) for i in range(5)]
    gc.start()
    await asyncio.gather(*futs)
    await gc.stop()
    assert write.peak == 1


async def test_concurrent_writes_reach_the_store_in_the_order_their_groups_formed():
    # An in-order store (one writer thread, as SQLite's) then applies them in that order.
    reached = []

    async def write(items):
        reached.append(items[0])  # the store call is made before the first suspension
        await asyncio.sleep(0.01 if items[0] % 2 else 0.002)
        return list(items)

    gc = GroupCommit(write, max_batch=1, max_pending=1000, concurrency=2)
    futs = [gc.commit([i]) for i in range(8)]
    gc.start()
    await asyncio.gather(*futs)
    await gc.stop()
    assert reached == list(range(8))


async def test_a_second_write_waits_while_few_items_are_queued_behind_the_first():
    sizes, overlapped = [], []
    running = 0

    async def write(items):
        nonlocal running
        sizes.append(len(items))
        overlapped.append(running > 0)
        running += 1
        await asyncio.sleep(0.02)
        running -= 1
        return list(items)

    gc = GroupCommit(write, max_batch=100, max_pending=1000, concurrency=2, overlap_at=50)
    gc.start()
    first = gc.commit([0])
    await asyncio.sleep(0.005)  # the first write is running now
    few = [gc.commit([0]) for _ in range(10)]  # not enough for a second write of their own
    await asyncio.gather(first, *few)
    many = [gc.commit([0] * 30)]
    await asyncio.sleep(0.005)
    many += [gc.commit([0] * 30), gc.commit([0] * 30)]  # 60 queued: a second write starts
    await asyncio.gather(*many)
    await gc.stop()
    assert list(zip(sizes, overlapped)) == [(1, False), (10, False), (30, False), (60, True)]


async def test_a_linger_spaces_calls_out_and_never_delays_an_idle_caller():
    starts = []

    async def write(items):
        starts.append((asyncio.get_running_loop().time(), len(items)))
        return list(items)

    loop = asyncio.get_running_loop()
    gc = GroupCommit(write, max_batch=100, max_pending=1000, linger_s=0.3)
    gc.start()
    began = loop.time()
    await gc.commit([0])  # idle: written at once, not a linger later
    first_wait = loop.time() - began
    # A stream of small commits while the last call is recent: one call for all of them.
    stream = []
    for _ in range(10):
        stream.append(gc.commit([0, 0]))
        await asyncio.sleep(0.005)
    await asyncio.gather(*stream)
    # A full batch waits for nothing but a call started just now.
    full = gc.commit([0] * 100)
    await full
    await gc.stop()
    assert first_wait < 0.15
    assert [n for _, n in starts] == [1, 20, 100]
    assert starts[1][0] - starts[0][0] >= 0.29  # the stream waited out the linger ...
    assert starts[2][0] - starts[1][0] < 0.15  # ... a full batch did not


async def test_stop_writes_what_lingers():
    written = []

    async def write(items):
        written.extend(items)
        return list(items)

    gc = GroupCommit(write, max_batch=100, max_pending=1000, linger_s=0.2)
    gc.start()
    await gc.commit([1])
    lingering = gc.commit([2, 3])
    await gc.stop()
    assert await lingering == [2, 3]
    assert written == [1, 2, 3]
