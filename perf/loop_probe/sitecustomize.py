"""Times every callback of a process's asyncio event loop: a perf tool, never for production.

With this directory first on PYTHONPATH and an output prefix in TASKWHEEL_LOOP_PROBE, every
Python process started so writes ``<prefix>.<pid>.json`` when it exits normally (the server
does on SIGTERM; the harness's workers, ended with os._exit, write nothing): for each wall
second, the loop's busy milliseconds and callback count, and every callback of 1 ms or more
as [end (epoch ms), wall ms, the thread's CPU ms, name]. A callback that takes far more wall
time than CPU waited for a core or for the GIL; one whose CPU is long did that much work.

    TASKWHEEL_LOOP_PROBE=/tmp/probe/p PYTHONPATH=perf/loop_probe .venv/bin/python \\
        perf/run_bench.py --driver taskwheel --scenario fire_50k --submitters 4 --batch 1000 \\
        --opt workers=2 --out /tmp/probe
    .venv/bin/python perf/loop_probe_report.py /tmp/probe/p /tmp/probe/taskwheel-fire_50k.json

It replaces asyncio.events.Handle._run, about a microsecond a callback.
"""
import asyncio.events
import atexit
import collections
import json
import os
import time

_PREFIX = os.environ.get("TASKWHEEL_LOOP_PROBE")
SLOW_MS = 1.0

if _PREFIX:
    _run = asyncio.events.Handle._run
    _busy_ms: collections.Counter = collections.Counter()
    _count: collections.Counter = collections.Counter()
    _slow: list = []

    def _name(handle) -> str:
        callback = getattr(handle, "_callback", None)
        task = getattr(callback, "__self__", None)
        if hasattr(task, "get_coro"):  # a task's step: name its coroutine
            coro = task.get_coro()
            return getattr(coro, "__qualname__", repr(coro))
        return getattr(callback, "__qualname__", None) or repr(callback)[:80]

    def _timed_run(self):
        started, cpu = time.perf_counter(), time.thread_time()
        _run(self)
        wall_ms = (time.perf_counter() - started) * 1000
        second = int(time.time())
        _busy_ms[second] += wall_ms
        _count[second] += 1
        if wall_ms >= SLOW_MS:
            _slow.append([time.time() * 1000, round(wall_ms, 2),
                          round((time.thread_time() - cpu) * 1000, 2), _name(self)])

    def _write() -> None:
        if not _count:
            return
        with open(f"{_PREFIX}.{os.getpid()}.json", "w") as f:
            json.dump({"busy_ms": sorted(_busy_ms.items()), "callbacks": sorted(_count.items()),
                       "slow": _slow}, f)

    asyncio.events.Handle._run = _timed_run
    atexit.register(_write)
