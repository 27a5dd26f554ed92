"""The embedded store's cost per ack, on its writer thread, as the fire path sees it.

Inserts ``--tasks`` tasks due at random over ``--window-s`` seconds (submit order is random
against due order, as in fire_50k), then acks every task in due order, as they fire,
``--batch`` acks per ``apply`` (dispatch's group commit), and reports the writer's CPU per
ack. The baseline, in the same process and store, is a second set of as many tasks due in
the order they were inserted (a stream of tasks due a fixed delay after submit), acked in
that order too: the best case for every page an ack touches. The ratio is what firing in an
order random against submits costs the writer.

    .venv/bin/python perf/bench_store_acks.py --tasks 500000

Nothing else should run in this process: the writer thread's CPU is measured with
``time.thread_time`` inside it, so other processes on the cores do not count, but its cache
misses and the other thread's GIL would.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path

from taskwheel.stores.base import Transition, TransitionKind
from taskwheel.task import TaskRecord
from taskwheel.stores.sqlite import SqliteStore


async def _ack_all(store: SqliteStore, tasks: list[TaskRecord], batch: int) -> float:
    """Acks ``tasks`` in the given order; returns the writer's CPU seconds spent on it."""
    cpu = 0.0
    for start in range(0, len(tasks), batch):
        part = [Transition(t.task_id, t.shard, TransitionKind.SUCCEED, t.gen, t.due_ms)
                for t in tasks[start:start + batch]]
        before = await store._write(time.thread_time)
        applied = await store.apply(part, now_ms=0)
        cpu += await store._write(time.thread_time) - before
        if not all(applied):
            raise SystemExit(f"{applied.count(False)} acks of a batch were not applied")
    return cpu


def _tasks(n: int, t0: int, window_ms: int, rng: random.Random, shuffled: bool) -> list[TaskRecord]:
    out = []
    for i in range(n):
        due = t0 + (rng.randrange(window_ms) if shuffled else i * window_ms // n)
        out.append(TaskRecord(task_id=uuid.uuid4().hex, shard=rng.randrange(16), queue="bench",
                              payload=b"x" * 16, fire_at_ms=due, due_ms=due))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=500_000, help="tasks acked in each order")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = 1_800_000_000_000
    window = int(args.window_s * 1000)
    shuffled = _tasks(args.tasks, t0, window, rng, shuffled=True)
    in_order = _tasks(args.tasks, t0 + window, window, rng, shuffled=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "tasks.db", num_shards=16, purge_every_s=0)
        await store.open()
        try:
            for tasks in (shuffled, in_order):
                for start in range(0, len(tasks), 1000):
                    await store.insert(tasks[start:start + 1000])
            random_cpu = await _ack_all(store, sorted(shuffled, key=lambda t: t.due_ms), args.batch)
            in_order_cpu = await _ack_all(store, in_order, args.batch)
        finally:
            await store.close()
    result = {
        "tasks": args.tasks, "batch": args.batch, "window_s": args.window_s,
        "us_per_ack_due_at_random": round(random_cpu / args.tasks * 1e6, 2),
        "us_per_ack_due_in_submit_order": round(in_order_cpu / args.tasks * 1e6, 2),
        "ratio": round(random_cpu / in_order_cpu, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"writer CPU per ack, acked as they fire: {result['us_per_ack_due_at_random']} us "
          f"for tasks due at random, {result['us_per_ack_due_in_submit_order']} us for tasks "
          f"due in submit order (baseline): "
          f"{result['ratio']}x, {args.tasks:,} tasks each, {args.batch} acks per apply")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
