"""Benchmarks of the compiled core, each beside a plain-Python baseline measured in the same run.

    .venv/bin/python -m pytest perf/bench_core.py --benchmark-only \\
        --benchmark-json=perf/results/core.json          # or: make bench
    .venv/bin/python perf/bench_core.py perf/results/core.json   # the table for docs/performance.md

* schedule+expire: 1M timers spread over 60 s, one schedule_many, then advance 1 ms at a time
  through all 60 s (60,000 advance calls), against a heapq of (deadline, seq, key).
* cancel: 1M pending timers cancelled in random order, against the heapq scheduler's lazy
  cancel (a dict pop; the heap entry stays until it surfaces).
* batcher: 1M items over 64 shards x 2 minute buckets, add_many in chunks of 1,000 then due(),
  against the same algorithm in plain Python.
* memory: bytes per pending timer with 1M pending, measured by tracemalloc (the timing of
  this group is not meaningful: tracemalloc is on).
* deliveries: one ConsumeResponse of 1,000 deliveries (32-byte payloads, no headers) to its
  wire bytes, as dispatch sends a message: encode_deliveries against the protobuf runtime as
  dispatch used it before (deliveries.add with keywords, the three timestamps merged from
  pre-encoded bytes shared by the message, SerializeToString).
* grow task ids: 700,000 task ids put 100 at a time (an ack message's worth) into dispatch's
  finished memory, a FinishedGeneration (64 dicts by hash, core/idshards.pxd), against one
  dict; the figure that matters is the longest step (``longest_step_ms``), the stall a dict
  rebuilt whole inside one step puts on the event loop.
* grow a wheel: 1.1M keys scheduled 512 a call (as the timer admits a slice), deadlines over
  60 s; the wheel's key table doubling a few buckets a call (``wheel``) against doubling whole
  in one call (``baseline``, the same wheel with incremental growth switched off). Again the
  figure is the longest call (``longest_step_ms``).

Setup (building inputs, filling the scheduler a cancel runs on) is outside the timed part.
Figures are per item; each core result carries its speed-up over its baseline in extra_info,
and pytest-benchmark's JSON records the machine, Python and the commit (perf/conftest.py adds
the load average and the library versions).
"""
from __future__ import annotations

import os

# numpy's OpenBLAS threads spin between calls; on a 2-core machine they steal the timed core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import heapq  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from taskwheel.core import Batcher, TimingWheel  # noqa: E402
from taskwheel.core.wheel import _set_move_min  # noqa: E402
from taskwheel.dispatch.deliveries import encode_deliveries  # noqa: E402
from taskwheel.dispatch.leases import FinishedGeneration  # noqa: E402
from taskwheel.task import TaskRecord  # noqa: E402
from taskwheel.v1 import dispatch_pb2, task_pb2  # noqa: E402

N = 1_000_000
SPAN_MS = 60_000
START_MS = 1_700_000_000_000
CHUNK = 1_000

# Per-item nanoseconds (best round) by (group, implementation), for the speed-up figures.
RESULTS: dict[tuple[str, str], float] = {}


class HeapScheduler:
    """The baseline: a heapq of (deadline, seq, key) with lazy cancellation, as the heapq docs
    recommend; the dict maps each pending key to the seq of its live heap entry."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int]] = []
        self._live: dict[int, int] = {}
        self._seq = 0

    def schedule_many(self, keys: list[int], deadlines: list[int]) -> None:
        heap, live, push, seq = self._heap, self._live, heapq.heappush, self._seq
        for key, deadline in zip(keys, deadlines):
            seq += 1
            live[key] = seq
            push(heap, (deadline, seq, key))
        self._seq = seq

    def cancel_many(self, keys: list[int]) -> int:
        pop = self._live.pop
        return sum(1 for key in keys if pop(key, None) is not None)

    def advance(self, now_ms: int) -> list[int]:
        heap, live, pop, fired = self._heap, self._live, heapq.heappop, []
        while heap and heap[0][0] <= now_ms:
            _, seq, key = pop(heap)
            if live.get(key) == seq:
                del live[key]
                fired.append(key)
        return fired

    def __len__(self) -> int:
        return len(self._live)


class PyBatcher:
    """The batcher's algorithm in plain Python: dict of lists, groups kept in creation order."""

    def __init__(self, max_items: int, max_delay_ms: int) -> None:
        self.max_items, self.max_delay_ms = max_items, max_delay_ms
        self._groups: dict[object, tuple[int, list[object]]] = {}

    def add_many(self, partitions: list[object], items: list[object], now_ms: int) -> list:
        groups, full, limit = self._groups, [], self.max_items
        for partition, item in zip(partitions, items):
            group = groups.get(partition)
            if group is None:
                group = groups[partition] = (now_ms, [])
            group[1].append(item)
            if len(group[1]) >= limit:
                del groups[partition]
                full.append((partition, group[1]))
        return full

    def due(self, now_ms: int) -> list:
        out = []
        for partition, (first_ms, items) in self._groups.items():
            if now_ms - first_ms < self.max_delay_ms:
                break
            out.append((partition, items))
        for partition, _ in out:
            del self._groups[partition]
        return out


@pytest.fixture(scope="module")
def timers():
    rng = np.random.default_rng(42)
    keys = np.arange(N, dtype=np.int64)
    deadlines = START_MS + rng.integers(1, SPAN_MS + 1, size=N)
    return keys, deadlines, rng.permutation(keys)


def per_item(benchmark, group: str, impl: str, items: int, **extra: float) -> None:
    """Records per-item figures of the best and the median round, and the speed-up."""
    stats = benchmark.stats.stats
    ns = stats.min / items * 1e9
    RESULTS[(group, impl)] = ns
    benchmark.extra_info.update(
        items=items,
        ns_per_item_best=round(ns, 2),
        ns_per_item_median=round(stats.median / items * 1e9, 2),
        items_per_s_best=round(items / stats.min),
        **{k: round(v, 2) for k, v in extra.items()},
    )
    baseline = RESULTS.get((group, "baseline"))
    if impl != "baseline" and baseline:
        benchmark.extra_info["speedup_vs_baseline"] = round(baseline / ns, 1)


@pytest.mark.parametrize("impl", ["baseline", "wheel"])
def test_schedule_and_expire_1m_timers_over_60s(benchmark, timers, impl):
    benchmark.group = "schedule+expire 1M timers over 60 s, 1 ms steps"
    keys, deadlines, _ = timers
    if impl == "wheel":
        ks, ds = keys, deadlines
        make = lambda: TimingWheel(tick_ms=1, start_ms=START_MS)  # noqa: E731
    else:
        ks, ds = keys.tolist(), deadlines.tolist()
        make = HeapScheduler
    phases: list[tuple[float, float]] = []
    fired: list[int] = []

    def run(scheduler):
        t0 = time.perf_counter()
        scheduler.schedule_many(ks, ds)
        t1 = time.perf_counter()
        advance, total = scheduler.advance, 0
        for now in range(START_MS + 1, START_MS + SPAN_MS + 1):
            total += len(advance(now))
        phases.append((t1 - t0, time.perf_counter() - t1))
        fired.append(total)

    # The baseline takes seconds a round: one round, no warm-up.
    rounds, warmup = (7, 1) if impl == "wheel" else (1, 0)
    benchmark.pedantic(run, setup=lambda: ((make(),), {}), rounds=rounds, warmup_rounds=warmup)
    assert fired == [N] * len(fired)
    best = min(phases, key=sum)
    per_item(benchmark, benchmark.group, impl, N,
             schedule_ns_per_timer=best[0] / N * 1e9, expire_ns_per_timer=best[1] / N * 1e9)


@pytest.mark.parametrize("impl", ["baseline", "wheel"])
def test_cancel_1m_pending_timers(benchmark, timers, impl):
    benchmark.group = "cancel 1M pending timers, random order"
    keys, deadlines, order = timers
    if impl == "wheel":
        ks, ds, cancel_keys = keys, deadlines, order
        make = lambda: TimingWheel(tick_ms=1, start_ms=START_MS)  # noqa: E731
    else:
        ks, ds, cancel_keys = keys.tolist(), deadlines.tolist(), order.tolist()
        make = HeapScheduler

    def setup():
        scheduler = make()
        scheduler.schedule_many(ks, ds)
        return (scheduler,), {}

    cancelled: list[int] = []
    benchmark.pedantic(lambda s: cancelled.append(s.cancel_many(cancel_keys)), setup=setup,
                       rounds=7 if impl == "wheel" else 3)
    assert cancelled == [N] * len(cancelled)
    per_item(benchmark, benchmark.group, impl, N)


@pytest.mark.parametrize("impl", ["baseline", "batcher"])
def test_batcher_1m_items(benchmark, impl):
    benchmark.group = "batcher 1M items, 128 partitions, chunks of 1,000"
    rng = np.random.default_rng(7)
    shards = rng.integers(0, 64, size=N).tolist()
    buckets = (28_333_333 + rng.integers(0, 2, size=N)).tolist()
    partitions = list(zip(shards, buckets))
    items = list(range(N))
    chunks = [(partitions[i:i + CHUNK], items[i:i + CHUNK]) for i in range(0, N, CHUNK)]
    make = (lambda: Batcher(512, 50)) if impl == "batcher" else (lambda: PyBatcher(512, 50))
    flushed: list[int] = []

    def run(batcher):
        out = 0
        for now, (ps, xs) in enumerate(chunks):
            for _, batch in batcher.add_many(ps, xs, now):
                out += len(batch)
            for _, batch in batcher.due(now):
                out += len(batch)
        flushed.append(out)

    benchmark.pedantic(run, setup=lambda: ((make(),), {}), rounds=5, warmup_rounds=1)
    assert all(n >= N - 128 * 512 for n in flushed)
    per_item(benchmark, benchmark.group, impl, N)


@pytest.mark.parametrize("impl", ["baseline", "wheel"])
def test_memory_per_pending_timer(benchmark, timers, impl):
    benchmark.group = "memory per pending timer, 1M pending (timing not meaningful)"
    keys, deadlines, _ = timers
    if impl == "wheel":
        ks, ds = keys, deadlines
        make = lambda: TimingWheel(tick_ms=1, start_ms=START_MS)  # noqa: E731
    else:
        ks, ds = keys.tolist(), deadlines.tolist()
        make = HeapScheduler
    grown: list[int] = []

    def build():
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            scheduler = make()
            scheduler.schedule_many(ks, ds)
            grown.append(tracemalloc.get_traced_memory()[0] - before)
            assert len(scheduler) == N
        finally:
            tracemalloc.stop()

    benchmark.pedantic(build, rounds=1)
    bytes_per_timer = grown[0] / N
    benchmark.extra_info.update(items=N, bytes_per_pending_timer=round(bytes_per_timer, 1))
    RESULTS[(benchmark.group, impl)] = bytes_per_timer


class _Sent:
    """What dispatch hands encode_deliveries: a fired task's record and its delivery's fields."""

    __slots__ = ("record", "delivery_id", "fired_at", "due_ms")

    def __init__(self, record: TaskRecord, fired_at: int) -> None:
        self.record = record
        self.delivery_id = f"{record.task_id}.2"
        self.fired_at = fired_at
        self.due_ms = fired_at + record.lease_ms


def _timestamps_field_bytes(fire_at: int, fired_at: int, expires: int) -> bytes:
    d = task_pb2.Delivery()
    for ts, ms in ((d.fire_at, fire_at), (d.fired_at, fired_at), (d.lease_expires_at, expires)):
        ts.seconds, rem = divmod(ms, 1000)
        ts.nanos = rem * 1_000_000
    return d.SerializeToString()


def _by_protobuf(sent: list[_Sent]) -> bytes:
    response = dispatch_pb2.ConsumeResponse()
    add = response.deliveries.add
    times: dict[tuple[int, int, int], bytes] = {}
    for item in sent:
        rec = item.record
        d = add(task_id=rec.task_id, delivery_id=item.delivery_id, queue=rec.queue,
                payload=rec.payload, attempt=rec.attempt, max_attempts=rec.max_attempts)
        key = (rec.fire_at_ms, item.fired_at, item.due_ms)
        encoded = times.get(key)
        if encoded is None:
            encoded = times[key] = _timestamps_field_bytes(*key)
        d.MergeFromString(encoded)
    return response.SerializeToString()


@pytest.mark.parametrize("impl", ["baseline", "encoder"])
def test_encode_1000_deliveries(benchmark, impl):
    benchmark.group = "ConsumeResponse of 1,000 deliveries to wire bytes"
    n = 1_000
    sent = [_Sent(TaskRecord(f"{START_MS:012x}0badcafe{i:08x}", 0, "perf", b"p" * 32,
                             START_MS + i // 50, START_MS + i // 50), START_MS + 20) for i in range(n)]
    encode = (lambda: encode_deliveries(sent)) if impl == "encoder" else (lambda: _by_protobuf(sent))
    data = benchmark.pedantic(encode, rounds=200, warmup_rounds=5)
    assert dispatch_pb2.ConsumeResponse.FromString(data).deliveries[-1].delivery_id == sent[-1].delivery_id
    per_item(benchmark, benchmark.group, impl, n)


@pytest.mark.parametrize("impl", ["baseline", "split"])
def test_grow_700k_task_ids_100_at_a_time(benchmark, impl):
    benchmark.group = "grow 700K task ids, 100 a step"
    ids = [f"{START_MS + i:012x}0badcafe{i:08x}" for i in range(700_000)]
    longest: list[float] = []

    def grow():
        table = {} if impl == "baseline" else FinishedGeneration(len(ids))
        worst = 0.0
        for start in range(0, len(ids), 100):
            began = time.perf_counter()
            for task_id in ids[start:start + 100]:
                table[task_id] = 1
            worst = max(worst, time.perf_counter() - began)
        longest.append(worst)
        return table

    table = benchmark.pedantic(grow, rounds=5, warmup_rounds=1)
    assert len(table) == len(ids) and table[ids[-1]] == 1
    median_longest_ms = statistics.median(longest[-5:]) * 1e3  # the 5 timed rounds, not the warm-up
    per_item(benchmark, benchmark.group, impl, len(ids), longest_step_ms=median_longest_ms)


@pytest.mark.parametrize("impl", ["baseline", "wheel"])
def test_grow_a_wheel_to_1_1m_keys_512_a_call(benchmark, impl):
    benchmark.group = "grow a wheel to 1.1M keys, 512 a call"
    n, chunk = 1_100_000, 512
    rng = np.random.default_rng(7)
    deadlines = START_MS + rng.integers(1_000, 60_000, size=n)
    keys = np.arange(n, dtype=np.int64)
    longest: list[float] = []

    def grow():
        wheel = TimingWheel(1, START_MS)
        worst = 0.0
        for start in range(0, n, chunk):
            began = time.perf_counter()
            wheel.schedule_many(keys[start:start + chunk], deadlines[start:start + chunk])
            worst = max(worst, time.perf_counter() - began)
        longest.append(worst)
        return wheel

    _set_move_min(1 << 62 if impl == "baseline" else 65_536)
    try:
        wheel = benchmark.pedantic(grow, rounds=5, warmup_rounds=1)
    finally:
        _set_move_min(65_536)
    assert len(wheel) == n
    median_longest_ms = statistics.median(longest[-5:]) * 1e3  # the 5 timed rounds, not the warm-up
    per_item(benchmark, benchmark.group, impl, n, longest_step_ms=median_longest_ms)


def report(path: str) -> str:
    """A Markdown table of a pytest-benchmark JSON written by this file."""
    data = json.loads(open(path).read())
    rows = ["| benchmark | implementation | per item (best) | per item (median) | items/s (best) "
            "| vs baseline |", "|---|---|---|---|---|---|"]
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        impl = bench["params"]["impl"]
        if "bytes_per_pending_timer" in info:
            rows.append(f"| {bench['group']} | {impl} | {info['bytes_per_pending_timer']} B | | | |")
            continue
        speedup = info.get("speedup_vs_baseline")
        if "longest_step_ms" in info:
            impl = f"{impl} (longest step {info['longest_step_ms']} ms)"
        rows.append(
            f"| {bench['group']} | {impl} | {info['ns_per_item_best']} ns | "
            f"{info['ns_per_item_median']} ns | {info['items_per_s_best'] / 1e6:.2f} M | "
            f"{f'{speedup}x' if speedup else ''} |")
    machine = data["machine_info"]
    rows.append("")
    rows.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
                f"{machine.get('cpu', {}).get('count', '?')} cores, Python {machine['python_version']}, "
                f"load average (1, 5, 15 min) as the run ended {machine.get('load_average', '?')}; "
                f"{data['datetime']}.")
    return "\n".join(rows)


if __name__ == "__main__":
    print(report(sys.argv[1]))
