"""Dispatch in process, on a real embedded store: how it takes what the timer fires."""
import asyncio
import time

from taskwheel.config import Config
from taskwheel.core import shard_of
from taskwheel.dispatch import DispatchService
from taskwheel.dispatch.servicer import BURST_CHUNK
from taskwheel.stores.base import TaskRecord
from taskwheel.stores.sqlite import SqliteStore


class QuietTimer:
    async def offer(self, records):
        pass

    async def forget(self, task_ids):
        pass


def test_a_burst_of_fired_tasks_is_taken_over_several_turns_of_the_event_loop(tmp_path):
    # So that the first deliveries leave, and the timer's fire loop runs, before all are taken.
    now = time.time_ns() // 1_000_000
    burst = [TaskRecord(task_id=f"t{i}", shard=shard_of(f"t{i}", 4), queue="q", payload=b"",
                        fire_at_ms=now, due_ms=now) for i in range(2 * BURST_CHUNK + 1)]

    async def main():
        store = SqliteStore(tmp_path / "t.db", num_shards=4)
        await store.open()
        dispatch = DispatchService(Config(), store, QuietTimer())
        seen = []

        async def watch():
            while True:
                seen.append(len(dispatch._waiting))
                await asyncio.sleep(0)

        watcher = asyncio.get_running_loop().create_task(watch())
        push = asyncio.get_running_loop().create_task(dispatch.push(burst, now))
        deadline = time.monotonic() + 10
        while len(dispatch._waiting) < len(burst) and time.monotonic() < deadline:
            await asyncio.sleep(0)
        push.cancel()  # no worker: it would wait for the tasks to be held
        watcher.cancel()
        await asyncio.gather(push, watcher, return_exceptions=True)
        await store.close()
        return seen

    seen = asyncio.run(main())
    assert any(0 < n < len(burst) for n in seen), seen[:5]
