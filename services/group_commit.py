"""Group commit: many callers' items become one store call.

Callers ``await commit(items)``; one flusher coroutine takes everything queued so far (up to
``max_batch`` items), makes one store call, and resolves each caller with its slice of the
results. While a call runs, the next group accumulates, so the batch size adapts to the load
with no timer. The queue is bounded: past ``max_pending`` items, ``commit`` raises Backpressure
at once instead of growing a buffer.

``concurrency`` > 1 lets that many store calls run at once. Calls start in the order their
groups formed, each reaching the store before the next starts; a latency-bound store (Cassandra)
may then finish them in any order, so only callers whose writes are independent (ingest's
inserts) use it there. A store that applies calls one at a time in arrival order (SQLite's
writer thread: ``Store.ordered_apply_depth``) keeps their order, so dispatch's transitions,
whose acks must not overtake their leases, use that depth. ``overlap_at`` holds a further call
back until that many items wait: a second call made for a few items halves the batches and
doubles the calls, which made the timer's lateness worse under load, while one made for a
backlog drains it.

``linger_s`` spaces calls out under load: a call starts at least that long after the previous
one started, unless ``max_batch`` items wait. A call costs the event loop a fixed ~100 us on
top of its items (a task, the executor's futures, the wake-ups between threads), and a fast
store finishes it before the next group has grown, so without a linger a busy stream of small
commits (dispatch's acks, one message at a time) makes as many calls as there are messages.
An idle caller is not held back: its call starts at once when the last started a linger ago.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable, Sequence


class Backpressure(Exception):
    """The write queue is full; retry after ``retry_after_ms``."""

    def __init__(self, pending: int, retry_after_ms: int):
        super().__init__(f"{pending} items are waiting for the store; retry in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class GroupCommit:
    def __init__(
        self,
        write: Callable[[list[Any]], Awaitable[Sequence[Any]]],
        *,
        max_batch: int,
        max_pending: int,
        concurrency: int = 1,
        overlap_at: int = 0,
        linger_s: float = 0.0,
    ) -> None:
        self._write = write
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task] = set()
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._overlap_at = overlap_at
        self._linger_s = linger_s
        self._last_start = float("-inf")
        self._queued = 0  # items in the queue, not yet in a running call
        self._queue: deque[tuple[Sequence[Any], asyncio.Future]] = deque()
        self._pending = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_batch_s = 0.01
        self.batches = 0
        self.items = 0

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            # Let queued writes finish: callers are waiting for durability.
            while self._queue or self._running:
                await asyncio.sleep(0.005)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def commit(self, items: Sequence[Any]) -> asyncio.Future:
        """Queues items; the future resolves to their results (or the store's exception)."""
        if self._pending + len(items) > self._max_pending and self._pending > 0:
            # Time to drain what is queued at the recent batch rate, at least 10 ms.
            per_item_s = self._last_batch_s / max(1, self._max_batch)
            raise Backpressure(self._pending, max(10, int(self._pending * per_item_s * 1000)))
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((items, fut))
        self._pending += len(items)
        self._queued += len(items)
        self._wake.set()
        return fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or (self._running and self._queued < self._overlap_at):
                self._wake.clear()
                await self._wake.wait()  # set by commit() and by a finished call
                continue
            if self._linger_s and self._queued < self._max_batch:
                wait = self._last_start + self._linger_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
            await self._slots.acquire()
            if not self._queue:
                self._slots.release()
                continue
            group: list[tuple[Sequence[Any], asyncio.Future]] = []
            batch: list[Any] = []
            while self._queue and (not batch or len(batch) + len(self._queue[0][0]) <= self._max_batch):
                items, fut = self._queue.popleft()
                group.append((items, fut))
                batch.extend(items)
            self._queued -= len(batch)
            self._last_start = loop.time()
            task = loop.create_task(self._flush(group, batch))
            self._running.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._wake.set()  # _run may be holding a call back until this one finished

    async def _flush(self, group: list[tuple[Sequence[Any], asyncio.Future]], batch: list[Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            try:
                results = await self._write(batch)
            except asyncio.CancelledError:
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(RuntimeError("store writer stopped"))
                raise
            except Exception as exc:  # the store's failure goes to every caller of the group
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                offset = 0
                for items, fut in group:
                    if not fut.done():
                        fut.set_result(results[offset:offset + len(items)])
                    offset += len(items)
            finally:
                self._pending -= len(batch)
                self._last_batch_s = max(loop.time() - started, 0.001)
                self.batches += 1
                self.items += len(batch)
        finally:
            self._slots.release()
