"""How many tasks a second the server accepts, with the client's cost taken out.

    python perf/submit_capacity.py --senders 8 --seconds 10 --out perf/results/e2e/submit-capacity

The scenario harness (run_bench.py) builds every TaskSpec in Python as a user's client would,
about 2 us a task, on the same two cores as the server. This measures the server alone, the
way ghz or wrk would: each sender process encodes 20 Submit requests of ``--batch`` tasks
before the clock starts (due 10-60 min out, so nothing fires) and sends them over and over
on one channel, one call in flight, for ``--seconds``. Reported: tasks accepted per second,
the server's CPU per task and the senders'. Every response is checked for refusals.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perf.drivers_taskwheel import READY_TIMEOUT_S, _free_port  # noqa: E402
from perf.run_bench import machine_context, read_cpu_seconds, read_thread_cpu_seconds  # noqa: E402

REQUESTS_PER_SENDER = 20


def _requests(batch: int, first_ms: int) -> list[bytes]:
    from taskwheel.v1 import ingest_pb2

    out = []
    for r in range(REQUESTS_PER_SENDER):
        request = ingest_pb2.SubmitRequest()
        for i in range(batch):
            fire_at = first_ms + (r * batch + i) * 3_000_000 // (REQUESTS_PER_SENDER * batch)
            spec = request.tasks.add(queue="capacity", payload=i.to_bytes(16, "little"))
            spec.fire_at.seconds, rem = divmod(fire_at, 1000)
            spec.fire_at.nanos = rem * 1_000_000
        out.append(request.SerializeToString())
    return out


def _sender(target: str, batch: int, start_at: float, end_at: float, results) -> None:
    try:
        results.put(_send(target, batch, start_at, end_at))
    except BaseException as exc:  # the parent raises it
        results.put(f"{type(exc).__name__}: {exc}")


def _send(target: str, batch: int, start_at: float, end_at: float) -> int:
    import grpc

    from taskwheel.v1 import ingest_pb2

    requests = _requests(batch, int(time.time() * 1000) + 600_000)
    channel = grpc.insecure_channel(target)
    submit = channel.unary_unary("/taskwheel.v1.Ingest/Submit")  # bytes in, bytes out
    time.sleep(max(0.0, start_at - time.time()))
    sent = 0
    while time.time() < end_at:
        raw = submit(requests[sent // batch % REQUESTS_PER_SENDER], timeout=60)
        sent += batch
        if sent // batch % REQUESTS_PER_SENDER == 0:  # spot-check one response in 20
            response = ingest_pb2.SubmitResponse.FromString(raw)
            refused = [r.error for r in response.results if r.code]
            if refused:
                raise RuntimeError(f"{len(refused)} tasks refused, e.g. {refused[0]}")
    return sent


def measure(senders: int, seconds: float, batch: int, server_args: list[str], store_query: str = "") -> dict:
    data_dir = tempfile.mkdtemp(prefix="taskwheel-capacity-")
    target = f"127.0.0.1:{_free_port()}"
    if store_query:  # a fresh embedded store each run, with these URL options
        server_args = [*server_args, "--store", f"sqlite://{os.path.join(data_dir, 'tasks.db')}?{store_query}"]
    server = subprocess.Popen(
        [sys.executable, "-m", "taskwheel.cli.main", "up", "--listen", target, "--data-dir", data_dir,
         *server_args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"serving on" not in server.stdout.readline():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("taskwheel up did not start")
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        start_at = time.time() + 3.0  # spawning and encoding stay outside the timed part
        end_at = start_at + seconds
        procs = [ctx.Process(target=_sender, args=(target, batch, start_at, end_at, results))
                 for _ in range(senders)]
        for p in procs:
            p.start()
        time.sleep(max(0.0, start_at - time.time()))
        server_cpu0 = read_cpu_seconds(server.pid) or 0.0
        threads0 = read_thread_cpu_seconds(server.pid)
        sender_cpu0 = sum(read_cpu_seconds(p.pid) or 0.0 for p in procs)
        time.sleep(max(0.0, end_at - time.time()))
        server_cpu = (read_cpu_seconds(server.pid) or 0.0) - server_cpu0
        threads = read_thread_cpu_seconds(server.pid)
        sender_cpu = sum(read_cpu_seconds(p.pid) or 0.0 for p in procs) - sender_cpu0
        counts = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        failures = [c for c in counts if isinstance(c, str)]
        if failures:
            raise RuntimeError(f"{len(failures)} sender(s) failed, e.g. {failures[0]}")
        accepted = sum(counts)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "senders": senders, "seconds": seconds, "batch": batch, "accepted": accepted,
        "accepted_per_s": accepted / seconds,
        # The last calls may end just past end_at: CPU over the window, tasks over the window.
        "server_cpu_us_per_task": server_cpu / accepted * 1e6,
        "sender_cpu_us_per_task": sender_cpu / accepted * 1e6,
        # Which of the server's threads the CPU went to (the event loop is "main"), in cores
        # busy over the window: a thread near 1.0 is what bounds the rate.
        "server_thread_cores": dict(sorted(
            ((name, round((cpu - threads0.get(name, 0.0)) / seconds, 3)) for name, cpu in threads.items()
             if cpu > threads0.get(name, 0.0)), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="repeat; the machine is noisy")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for taskwheel up")
    parser.add_argument("--out", type=Path, default=None, help="directory for capacity.json")
    parser.add_argument("--store-query", default="",
                        help="options of the embedded store's URL, e.g. thread_nice=0 (a fresh store each run)")
    args = parser.parse_args(argv)
    context = machine_context()
    runs = []
    for i in range(args.runs):
        run = measure(args.senders, args.seconds, args.batch, args.server_arg, args.store_query)
        runs.append(run)
        print(f"run {i + 1}: {run['accepted_per_s']:,.0f} tasks/s accepted; server CPU "
              f"{run['server_cpu_us_per_task']:.1f} us/task, senders {run['sender_cpu_us_per_task']:.1f} us/task; "
              "server threads (cores): " + ", ".join(
                  f"{name} {cores:.2f}" for name, cores in list(run["server_thread_cores"].items())[:4]),
              flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "capacity.json"
        path.write_text(json.dumps({"context": context, "command": " ".join(["python"] + sys.argv),
                                    "runs": runs}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
