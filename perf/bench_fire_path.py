"""CPU of the event loop per fired task, from the timer's fire to the forget after the ack.

    .venv/bin/python perf/bench_fire_path.py                  # 3 repetitions of 100,000 tasks
    .venv/bin/python perf/bench_fire_path.py --tasks 50000 --rate 50000 --repeat 1
    .venv/bin/python perf/bench_fire_path.py --ack-after-ms 300  # every lease written first

One process, everything on one asyncio loop, as in the embedded mode: a real SqliteStore in a
temporary directory, the TimerService and DispatchService started with their own loops (fire,
load, checkpoint, lease, hold, group commit), and an in-process worker driving the servicer's
own ``Consume`` stream. No gRPC server: the worker stands in for grpc.aio at the stream's two
ends, doing on the loop what grpc.aio does there (taking each ConsumeResponse's bytes, parsing
each ConsumeRequest), and acks every delivery of a message at once, as perf/run_bench.py's worker
does. What the worker itself does (reading a delivery, building its ack) is another process's
work in production: it is timed and left out of every figure.

Setup (inserting the tasks, due ``--rate`` per second from a few seconds ahead, and waiting
until the timer has loaded them all) is outside the timed part, which runs from just before the
first due time until every task is acked, written and forgotten. Reported, in microseconds of
loop-thread CPU (time.thread_time) per task:

* total: the whole loop thread, less the worker, measured without instrumentation.
* process: every thread of the process, less the worker: the loop, and the store's writer
  thread applying the acks (the timer loaded every task before the timed part, so the reader
  thread's loading is not in it). The threads share one GIL, so what the writer does in
  Python delays the loop too.
* per stage, in a second run of the same size with every callback the loop runs and the fire
  path's methods timed (exclusive of what they call that is timed too): fire+take, deliver,
  lease loop (dropping answered deliveries after lease_write_delay_ms), ack, written+forget,
  other (the loop itself, the services' other loops). Instrumentation adds about a
  microsecond per timed call, so these sum to more than the plain total.
* net GC-tracked objects: the growth of gc.get_count()[0] (collection is off, as in the
  server) at its peak and at the end, per task.

The machine is shared and noisy: compare two versions only in back-to-back runs.
"""
from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict

from taskwheel.clock import now_ms
from taskwheel.cluster.shards import ShardOwner
from taskwheel.config import Config
from taskwheel.core import shard_of
from taskwheel.dispatch import DispatchService, DispatchServicer
from taskwheel.task import TaskRecord
from taskwheel.stores.sqlite import SqliteStore
from taskwheel.timer import TimerService
from taskwheel.v1 import dispatch_pb2

QUEUE = "bench"
LEAD_MS = 1_500  # from building the records to the first due time, plus 20 us a task: the setup fits

# Where each timed place belongs. Tasks are named by their coroutine, callbacks by qualname.
STAGES = {
    "fire+take": ("task TimerService._fire_loop", "task TimerService._retry_hand_over", "_take_fired",
                  "callback _wake"),
    "deliver": ("_pump", "grpc: serialize response", "task _consume"),
    "lease loop": ("task DispatchService._lease_loop",),
    "ack": ("ack", "write", "grpc: parse request", "task DispatchServicer._read_answers"),
    # With the lease rows written for deliveries not answered within lease_write_delay_ms,
    # offered back to the timer.
    "written+forget": ("_written", "_forget", "_admit", "task GroupCommit._run", "task GroupCommit._flush"),
}
SKIPPED = ("worker", "bench")
STALL_S = 30.0  # a timed part that changes nothing for this long has failed


class Profile:
    """Exclusive loop-thread CPU per place: every handle the loop runs, and wrapped methods."""

    def __init__(self) -> None:
        self.cpu: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._nested = 0  # CPU of the timed calls inside the one running

    def wrap(self, name: str, fn):
        clock = time.thread_time_ns

        def timed(*args, **kwargs):
            outer = self._nested
            self._nested = 0
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = clock() - started
                self.cpu[name] += spent - self._nested
                self.calls[name] += 1
                self._nested = outer + spent

        return timed

    def install_on_loop(self) -> None:
        """Times every asyncio Handle (task steps, callbacks, timers) by its owner."""
        run = asyncio.events.Handle._run
        clock = time.thread_time_ns
        profile = self

        def timed_run(handle):
            profile._nested = 0
            started = clock()
            run(handle)
            spent = clock() - started
            name = _owner(handle._callback)
            profile.cpu[name] += spent - profile._nested
            profile.calls[name] += 1

        asyncio.events.Handle._run = timed_run
        self._restore = lambda: setattr(asyncio.events.Handle, "_run", run)

    def uninstall(self) -> None:
        self._restore()


def _owner(callback) -> str:
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return "task " + getattr(coro, "__qualname__", type(coro).__name__)
    return "callback " + getattr(callback, "__qualname__", type(callback).__name__)


class _Context:
    async def abort(self, code, details):
        raise RuntimeError(f"aborted: {code} {details}")


class _RequestStream:
    """The request side of a Consume stream as grpc.aio hands it to the servicer: parsed from
    the bytes the worker sent."""

    def __init__(self, parse) -> None:
        self.sent: asyncio.Queue = asyncio.Queue()
        self._parse = parse

    def __aiter__(self):
        return self

    async def __anext__(self):
        data = await self.sent.get()
        if data is None:
            raise StopAsyncIteration
        return self._parse(data)


def _worker_reply(data: bytes) -> bytes:
    """The worker's side: read the deliveries, ack them all in one message."""
    msg = dispatch_pb2.ConsumeResponse.FromString(data)
    return dispatch_pb2.ConsumeRequest(
        ack=dispatch_pb2.Ack(delivery_ids=[d.delivery_id for d in msg.deliveries])).SerializeToString()


async def _consume(dispatch: DispatchServicer, stream: _RequestStream, max_in_flight: int,
                   serialize, worker_cpu: list, ack_after_ms: int) -> None:
    """Runs the servicer's Consume generator as grpc.aio would, with the worker's replies."""
    clock = time.thread_time_ns
    loop = asyncio.get_running_loop()
    stream.sent.put_nowait(dispatch_pb2.ConsumeRequest(subscribe=dispatch_pb2.Subscribe(
        queue=QUEUE, max_in_flight=max_in_flight)).SerializeToString())
    async for msg in dispatch.Consume(stream, _Context()):
        data = serialize(msg)
        started = clock()
        reply = _worker_reply(data)
        worker_cpu[0] += clock() - started
        if ack_after_ms:
            loop.call_later(ack_after_ms / 1000, stream.sent.put_nowait, reply)
        else:
            stream.sent.put_nowait(reply)


def _records(n: int, rate: int, first_due: int, shards: int) -> list[TaskRecord]:
    return [TaskRecord(task_id=f"bench-{i:07d}", shard=shard_of(f"bench-{i:07d}", shards),
                       queue=QUEUE, payload=b"p" * 32, fire_at_ms=first_due + i * 1000 // rate,
                       due_ms=first_due + i * 1000 // rate, created_ms=first_due - LEAD_MS - n // 50)
            for i in range(n)]


async def run_once(n: int, rate: int, max_in_flight: int, ack_after_ms: int, profiled: bool,
                   data_dir: str) -> dict:
    config = Config(data_dir=data_dir, lookahead_ms=10_000, slice_ms=1_000)
    store = SqliteStore(os.path.join(data_dir, "tasks.db"))
    await store.open()
    first_due = now_ms() + LEAD_MS + n // 50
    records = _records(n, rate, first_due, store.num_shards)
    for start in range(0, n, 10_000):
        await store.insert(records[start:start + 10_000])
    del records

    dispatch = DispatchService(config, store)
    timer = TimerService(config, store, dispatch)
    profile = Profile() if profiled else None
    serialize = bytes  # the servicer yields wire bytes, which grpc sends as they are
    parse = dispatch_pb2.ConsumeRequest.FromString
    if profile is not None:
        for name in ("_take_fired", "_pump", "ack"):
            setattr(dispatch, name, profile.wrap(name, getattr(dispatch, name)))
        for name in ("write", "_written"):
            setattr(dispatch._writer, name, profile.wrap(name, getattr(dispatch._writer, name)))
        for name in ("_forget", "_admit", "_hand_over"):
            setattr(timer, name, profile.wrap(name, getattr(timer, name)))
        serialize = profile.wrap("grpc: serialize response", serialize)
        parse = profile.wrap("grpc: parse request", parse)
    await dispatch.start(timer)
    await timer.start()
    # A cluster of one, as `taskwheel up` runs: the node takes every shard.
    owner = ShardOwner(config, store, "bench", "127.0.0.1:1", frozenset({"timer", "dispatch"}), timer)
    await owner.start()
    stream = _RequestStream(parse)
    worker_cpu = [0]
    consumer = asyncio.get_running_loop().create_task(
        _consume(DispatchServicer(dispatch), stream, max_in_flight, serialize, worker_cpu, ack_after_ms),
        name="consume stream")
    # Loaded, or some already fired: a slow setup must not wait for a wheel that never fills.
    while len(timer.wheel) + timer.fired < n:
        await asyncio.sleep(0.01)
    late = now_ms() - first_due
    if late > -20:
        print(f"  warning: setup ended {late + 20} ms too late; the first tasks fire in a burst",
              file=sys.stderr)
    await asyncio.sleep(max(0, first_due - 20 - now_ms()) / 1000)

    # The timed part: from just before the first due time until all is forgotten. The
    # interpreter as the server tunes it (app.tune_runtime): the cyclic GC off.
    gc.collect()
    gc.freeze()
    gc.disable()
    objects_at_start = peak = gc.get_count()[0]
    if profile is not None:
        profile.cpu.clear()  # the loader's admits during the setup
        profile.calls.clear()
        profile.install_on_loop()
    worker_cpu[0] = 0
    cpu_started = time.thread_time_ns()
    process_started = time.process_time_ns()
    wall_started = time.perf_counter()
    progress, stalled_since = None, time.monotonic()
    while not (dispatch.acked >= n and not dispatch._writer.pending and not timer._unconfirmed
               and not len(timer.wheel)):
        await asyncio.sleep(0.005)
        peak = max(peak, gc.get_count()[0])
        state = (dispatch.acked, dispatch.delivered, dispatch._writer.pending, len(timer._unconfirmed),
                 len(timer.wheel), timer.fired)
        if state != progress:
            progress, stalled_since = state, time.monotonic()
        elif time.monotonic() - stalled_since > STALL_S:
            # Something never finished (a lost task, a write never confirmed): say what, not hang.
            raise RuntimeError(
                f"no progress for {STALL_S:.0f} s: acked {state[0]} and delivered {state[1]} of {n}, "
                f"{state[2]} transitions waiting for the writer, {state[3]} pushes unconfirmed, "
                f"{state[4]} tasks in the wheel, {state[5]} fired")
    cpu = time.thread_time_ns() - cpu_started
    process_cpu = time.process_time_ns() - process_started
    wall = time.perf_counter() - wall_started
    objects_at_end = gc.get_count()[0]
    if profile is not None:
        profile.uninstall()
    gc.enable()
    gc.unfreeze()

    await stream.sent.put(None)
    await consumer
    await owner.stop()
    await timer.stop()
    await dispatch.stop()
    await store.close()
    counted = cpu - worker_cpu[0]
    result = {
        "total": counted / n / 1000,
        "process": (process_cpu - worker_cpu[0]) / n / 1000,
        "wall_s": wall,
        "lag_ms": timer.lag_ms,
        "coalesced": dispatch.coalesced / n,
        "objects_peak": (peak - objects_at_start) / n,
        "objects_end": (objects_at_end - objects_at_start) / n,
    }
    if profile is not None:
        by_place = dict(profile.cpu)
        # The worker ran inside the consume stream's task: its CPU is that task's, less the worker.
        by_place["task _consume"] -= worker_cpu[0]
        by_place["worker"] = worker_cpu[0]
        stages = {stage: 0 for stage in STAGES}
        stages["other"] = 0
        for place, ns in by_place.items():
            if place in SKIPPED or place == "task run_once":
                continue
            stage = next((s for s, places in STAGES.items() if place in places), "other")
            stages[stage] += ns
        stages["other"] += counted - sum(by_place.values())  # the loop itself: select, scheduling
        result["stages"] = {k: v / n / 1000 for k, v in stages.items()}
        result["places"] = {k: (v / n / 1000, profile.calls.get(k, 0)) for k, v in by_place.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=30_000, help="tasks due per second")
    parser.add_argument("--max-in-flight", type=int, default=10_000, help="the worker's subscribe")
    parser.add_argument("--ack-after-ms", type=int, default=0,
                        help="the worker's delay before acking a message; past the lease write delay "
                             "(lease_write_delay_ms, 250 ms) every delivery's lease is written first")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--places", action="store_true", help="print every timed place too")
    parser.add_argument("--no-stages", action="store_true", help="only the plain runs")
    args = parser.parse_args()

    print(f"# {args.tasks} tasks at {args.rate}/s, worker max_in_flight {args.max_in_flight}, acks after "
          f"{args.ack_after_ms} ms; "
          f"python {platform.python_version()}, {os.cpu_count()} cpus, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, taskwheel from "
          f"{os.path.dirname(sys.modules['taskwheel'].__file__)}")
    plain, staged = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-fire-") as d:
            plain.append(asyncio.run(run_once(args.tasks, args.rate, args.max_in_flight, args.ack_after_ms, False, d)))
        r = plain[-1]
        print(f"total {r['total']:6.2f} us/task  process {r['process']:6.2f}  wall {r['wall_s']:.2f} s  coalesced "
              f"{r['coalesced']:.2f}  tracked objects/task: peak {r['objects_peak']:.2f} end "
              f"{r['objects_end']:.2f}")
        if args.no_stages:
            continue
        with tempfile.TemporaryDirectory(prefix="bench-fire-") as d:
            staged.append(asyncio.run(run_once(args.tasks, args.rate, args.max_in_flight, args.ack_after_ms, True, d)))
        r = staged[-1]
        print("  profiled " + "  ".join(f"{k} {v:5.2f}" for k, v in r["stages"].items())
              + f"  (sum {sum(r['stages'].values()):.2f})")
        if args.places:
            for place, (us, calls) in sorted(r["places"].items(), key=lambda kv: -kv[1][0]):
                print(f"    {us:6.2f} us/task  {calls:8d} calls  {place}")
    print("median total %.2f us/task, process %.2f" % (
        statistics.median(r["total"] for r in plain), statistics.median(r["process"] for r in plain)))
    if staged:
        print("median " + "  ".join(
            f"{k} {statistics.median(r['stages'][k] for r in staged):5.2f}" for k in staged[0]["stages"]))


if __name__ == "__main__":
    main()
