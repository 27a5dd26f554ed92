"""perf/loop_probe: a process started with it names the loop's slow callbacks, with their CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import asyncio, time

async def busy_step():
    end = time.thread_time() + 0.02
    while time.thread_time() < end:  # 20 ms of this thread's CPU, however busy the machine
        pass

async def sleeping_step():
    time.sleep(0.02)  # 20 ms off the CPU

async def main():
    await asyncio.gather(busy_step(), sleeping_step())

asyncio.run(main())
"""


def test_the_probe_writes_each_slow_callback_with_its_wall_and_cpu_time(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "perf" / "loop_probe"),
               TASKWHEEL_LOOP_PROBE=str(tmp_path / "p"))
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, timeout=60)
    (path,) = tmp_path.glob("p.*.json")
    probe = json.loads(path.read_text())
    slow = {name: (wall, cpu) for _, wall, cpu, name in probe["slow"]}
    assert slow["busy_step"][0] >= 19 and slow["busy_step"][1] >= 19
    assert slow["sleeping_step"][0] >= 19 and slow["sleeping_step"][1] < 5
    assert sum(n for _, n in probe["callbacks"]) >= 2


def test_without_the_variable_the_probe_writes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "perf" / "loop_probe"))
    env.pop("TASKWHEEL_LOOP_PROBE", None)
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, cwd=tmp_path, timeout=60)
    assert list(tmp_path.iterdir()) == []


STORE_PROGRAM = """
import asyncio, sys
from taskwheel.stores.base import Transition, TransitionKind
from taskwheel.task import TaskRecord
from taskwheel.stores.sqlite import SqliteStore

async def main(path):
    store = SqliteStore(path, num_shards=1)
    await store.open()
    tasks = [TaskRecord(task_id=f"t{i}", shard=0, queue="q", payload=b"x", fire_at_ms=1000 + i,
                        due_ms=1000 + i) for i in range(30)]
    await store.insert(tasks)
    due = await store.load_due(0, 1000, 1020)
    await store.apply([Transition(t.task_id, 0, TransitionKind.SUCCEED, 1, t.due_ms) for t in due], 5000)
    await store.close()

asyncio.run(main(sys.argv[1]))
"""


def test_the_probe_times_the_store_calls_with_their_items(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "perf" / "loop_probe"),
               TASKWHEEL_LOOP_PROBE=str(tmp_path / "p"))
    subprocess.run([sys.executable, "-c", STORE_PROGRAM, str(tmp_path / "tasks.db")], env=env,
                   check=True, timeout=60)
    (path,) = tmp_path.glob("p.*.json")
    calls = json.loads(path.read_text())["store"]
    items = {name: n for _, _, name, n, _, _ in calls if name in ("_insert", "_load_due", "_apply")}
    assert items == {"_insert": 30, "_load_due": 20, "_apply": 20}
    assert all(wall >= 0 and cpu >= 0 for *_, wall, cpu in calls)
    threads = {thread for _, thread, name, *_ in calls if name == "_apply"}
    assert threads and all(t.startswith("taskwheel-sqlite-w") for t in threads)


def test_the_report_sums_store_calls_by_thread_and_function():
    sys.path.insert(0, str(REPO / "perf"))
    try:
        from loop_probe_report import store_summary
    finally:
        sys.path.remove(str(REPO / "perf"))
    calls = [[0, "w", "_apply", n, 2.0, 1.0] for n in (100, 200, 300)] + [[0, "w", "_save_checkpoints", None, 0.1, 0.1]]
    header, apply_line, checkpoints_line = store_summary(calls, seconds=2.0)
    assert apply_line.split()[:4] == ["w", "_apply", "3", "600"]
    assert "100/200/300/300" in apply_line
    assert apply_line.endswith("5.00 us")  # 3 ms of CPU over 600 items
    assert checkpoints_line.split()[:4] == ["w", "_save_checkpoints", "1", "0"]
    assert checkpoints_line.endswith("-")
