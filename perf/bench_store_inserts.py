"""The embedded store's cost per insert, by how far the tasks' due times spread and by batch.

Inserts ``--tasks`` tasks into a fresh store for each (spread, batch) pair, with ids made as
ingest makes them (time-ordered, ``TaskIds``) and due times uniform over the spread, starting a
minute out, ``batch`` tasks per ``insert`` (ingest's group commit). Reports the writer
thread's CPU per task and the bytes the process wrote per task (the WAL and the checkpoints
that copy it back, from psutil's I/O counters, read after the checkpointer caught up). The baseline,
in the same run, is the first pair: a 60 s spread at 1,000 a batch.

    .venv/bin/python perf/bench_store_inserts.py --tasks 300000

Why the spread matters: due rows are clustered by (shard, minute), so tasks due over an hour
land in 16 x 60 partitions, and a batch of 1,000 would dirty about one page of them per task,
where a 60 s spread puts many tasks on each page. Since schema version 5 rows due a few
minutes ahead or more go to ``due_far`` first (12 insertion points an hour) and the promoter
moves them into their partitions, in sorted runs, before they fall due; the figures count that
move apart (promote) and together (total). Nothing else should run in this process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import psutil

from taskwheel.ingest.validate import TaskIds
from taskwheel.task import TaskRecord
from taskwheel.stores.sqlite import SqliteStore

CHECKPOINT_WAIT_S = 1.0  # the checkpointer runs every 0.25 s; give it a few turns


def written_bytes() -> int | None:
    """Bytes this process has caused to be written to storage, or None where the platform does
    not count them (psutil has no I/O counters on macOS)."""
    try:
        return psutil.Process().io_counters().write_bytes
    except (AttributeError, psutil.Error):
        return None


def tasks_for(n: int, spread_ms: int, first_due_ms: int, rng: random.Random) -> list[TaskRecord]:
    ids = TaskIds()
    out = []
    for task_id in ids.take(first_due_ms - 60_000, n):
        due = first_due_ms + rng.randrange(spread_ms)
        out.append(TaskRecord(task_id=task_id, shard=rng.randrange(16), queue="bench",
                              payload=b"x" * 16, fire_at_ms=due, due_ms=due))
    return out


async def measure(tasks: list[TaskRecord], batch: int, directory: str) -> dict[str, float | None]:
    """Inserts ``tasks`` into a fresh store; the writer's CPU and the bytes written, per task."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = SqliteStore(Path(tmp) / "tasks.db", num_shards=16, purge_every_s=0)
        await store.open()
        try:
            before_bytes = written_bytes()
            before_cpu = await store._write(time.thread_time)
            for start in range(0, len(tasks), batch):
                outcomes = await store.insert(tasks[start:start + batch])
                if any(o.duplicate for o in outcomes):
                    raise SystemExit("a task of a fresh store was not inserted")
            cpu = await store._write(time.thread_time) - before_cpu
            await asyncio.sleep(CHECKPOINT_WAIT_S)
            after_bytes = written_bytes()
            # What the inserts left to the promoter: moving every far bucket into ``due``,
            # as it will before they fall due.
            promoted = await store.promote(before_ms=max(t.due_ms for t in tasks) + 1)
            promote_cpu = await store._write(time.thread_time) - before_cpu - cpu
            await asyncio.sleep(CHECKPOINT_WAIT_S)
            promote_bytes = written_bytes()
        finally:
            await store.close()
    n = len(tasks)
    known = before_bytes is not None and after_bytes is not None and promote_bytes is not None
    return {
        "us_per_task": round(cpu / n * 1e6, 2),
        "bytes_per_task": round((after_bytes - before_bytes) / n) if known else None,
        "promoted": promoted,
        "promote_us_per_task": round(promote_cpu / n * 1e6, 2),
        "promote_bytes_per_task": round((promote_bytes - after_bytes) / n) if known else None,
        "total_us_per_task": round((cpu + promote_cpu) / n * 1e6, 2),
    }


def _or_dash(value: object) -> object:
    return "-" if value is None else value


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=300_000, help="tasks inserted for each pair")
    ap.add_argument("--spreads-s", default="60,3600", help="due-time spreads, seconds, comma-separated")
    ap.add_argument("--batches", default="1000,5000", help="tasks per insert, comma-separated")
    ap.add_argument("--dir", default=None, help="where the stores are made (a disk, not tmpfs)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args()
    spreads = [int(float(s) * 1000) for s in args.spreads_s.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if not spreads or not batches or min(spreads) <= 0 or min(batches) <= 0 or args.tasks <= 0:
        raise SystemExit("--tasks, every spread and every batch must be positive")
    first_due_ms = int(time.time() * 1000) + 60_000
    rows = []
    for spread in spreads:
        tasks = tasks_for(args.tasks, spread, first_due_ms, random.Random(args.seed))
        for batch in batches:
            figures = await measure(tasks, batch, args.dir)
            rows.append({"spread_s": spread / 1000, "batch": batch, **figures})
    base = rows[0]
    print(f"{args.tasks:,} tasks a row; baseline: {base['spread_s']:g} s spread, {base['batch']} a batch")
    print("insert: the writer's CPU and bytes written a task by insert; promote: the same for moving")
    print("the far due rows to their partitions afterwards (rows moved: promoted)")
    print(f"{'spread':>8s} {'batch':>6s} {'insert CPU':>11s} {'vs base':>8s} {'bytes':>7s} {'vs base':>8s}"
          f" {'promoted':>9s} {'promote CPU':>12s} {'bytes':>7s} {'total CPU':>10s} {'vs base':>8s}")
    for row in rows:
        row["cpu_ratio"] = round(row["us_per_task"] / base["us_per_task"], 2)
        row["total_cpu_ratio"] = round(row["total_us_per_task"] / base["total_us_per_task"], 2)
        row["bytes_ratio"] = (round(row["bytes_per_task"] / base["bytes_per_task"], 2)
                              if row["bytes_per_task"] and base["bytes_per_task"] else None)
        print(f"{row['spread_s']:7g}s {row['batch']:6d} {row['us_per_task']:8.2f} us {row['cpu_ratio']:7.2f}x "
              f"{_or_dash(row['bytes_per_task']):>5} B {_or_dash(row['bytes_ratio']):>7}x "
              f"{row['promoted']:9d} {row['promote_us_per_task']:9.2f} us "
              f"{_or_dash(row['promote_bytes_per_task']):>5} B {row['total_us_per_task']:7.2f} us "
              f"{row['total_cpu_ratio']:7.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "tasks": args.tasks, "rows": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
