"""Times every callback of a process's asyncio event loop: a perf tool, never for production.

With this directory first on PYTHONPATH and an output prefix in TASKWHEEL_LOOP_PROBE, every
Python process started so writes ``<prefix>.<pid>.json`` when it exits normally (the server
does on SIGTERM; the harness's workers, ended with os._exit, write nothing): for each wall
second, the loop's busy milliseconds and callback count, and every callback of 1 ms or more
as [end (epoch ms), wall ms, the thread's CPU ms, name]. A callback that takes far more wall
time than CPU waited for a core or for the GIL; one whose CPU is long did that much work.

It also times every call the embedded store runs on its own threads (``SqliteStore._guard``:
acks and leases, inserts, due slices, checkpoints) as [end (epoch ms), thread, function,
items, wall ms, the thread's CPU ms] under "store": items is the length of what the call
returned (one result a transition, an outcome a task, a record a due row), or else of its
first argument. So the writer's CPU an ack, and the group commit's batch sizes, are read off
a real run instead of a micro-benchmark.

    TASKWHEEL_LOOP_PROBE=/tmp/probe/p PYTHONPATH=perf/loop_probe .venv/bin/python \\
        perf/run_bench.py --driver taskwheel --scenario fire_50k --submitters 4 --batch 1000 \\
        --opt workers=2 --out /tmp/probe
    .venv/bin/python perf/loop_probe_report.py /tmp/probe/p /tmp/probe/taskwheel-fire_50k.json

It replaces asyncio.events.Handle._run, about a microsecond a callback, and wraps the store's
``_guard`` once ``taskwheel.stores.sqlite`` is imported (a finder first on sys.meta_path).
"""
import asyncio.events
import atexit
import collections
import importlib.abc
import json
import os
import sys
import threading
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

    _store: list = []
    _STORE_MODULE = "taskwheel.stores.sqlite"

    def _items(args: tuple, result) -> int | None:
        for value in (result, args[0] if args else None):
            if isinstance(value, (list, tuple, dict)):
                return len(value)
        return None

    def _time_store_calls(module) -> None:
        guard = module.SqliteStore._guard

        def _timed_guard(self, fn, args):
            started, cpu = time.perf_counter(), time.thread_time()
            result = guard(self, fn, args)
            _store.append([time.time() * 1000, threading.current_thread().name,
                           getattr(fn, "__name__", repr(fn)), _items(args, result),
                           round((time.perf_counter() - started) * 1000, 3),
                           round((time.thread_time() - cpu) * 1000, 3)])
            return result

        module.SqliteStore._guard = _timed_guard

    class _StoreFinder(importlib.abc.MetaPathFinder):
        """Finds nothing itself: asks the other finders for the store module and wraps its
        loader, so the store's calls are timed from the moment the module exists."""

        def find_spec(self, name, path, target=None):
            if name != _STORE_MODULE:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    exec_module = spec.loader.exec_module

                    def _exec_then_wrap(module, exec_module=exec_module):
                        exec_module(module)
                        _time_store_calls(module)

                    spec.loader.exec_module = _exec_then_wrap
                    return spec
            return None

    def _write() -> None:
        if not _count and not _store:
            return
        with open(f"{_PREFIX}.{os.getpid()}.json", "w") as f:
            json.dump({"busy_ms": sorted(_busy_ms.items()), "callbacks": sorted(_count.items()),
                       "slow": _slow, "store": _store}, f)

    asyncio.events.Handle._run = _timed_run
    sys.meta_path.insert(0, _StoreFinder())
    atexit.register(_write)
