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
