"""taskwheel under the benchmark harness, through its public gRPC API only.

Servers: ``taskwheel up`` (one process, the embedded default; with ``--opt nodes=N``, N of them
on one store, a cluster: submitters and workers are spread over the nodes in turn) or, with
``--opt mode=split``, ``taskwheel serve ingest|timer|dispatch`` as three processes. Submitters call Ingest.Submit
with one TaskSpec per task (fire_at = the scenario's time, payload = seq and fire time);
workers are separate processes holding one Dispatch.Consume stream each, recording every
delivery (and its fired_at) the moment its message arrives and acking the whole message in
one Ack.

Options (``--opt key=value``):
  store          a --store URL (default: the embedded store in the run dir)
  mode           one (default) | split
  nodes          with mode one: how many ``taskwheel up`` share the store (default 1)
  workers        worker processes (default 1)
  max_in_flight  per worker stream (default 10000)
  server_args    extra flags for the server processes, space separated
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from perf.drivers import Driver, ReceiptLog, Submitter, decode_payload, encode_payload, receipts_dir

QUEUE = "perf"
READY_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TaskwheelSubmitter(Submitter):
    def __init__(self, target: str) -> None:
        import grpc

        from taskwheel.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2

        self._grpc = grpc
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 << 20)])
        self._submit = ingest_pb2_grpc.IngestStub(self._channel).Submit
        self._request = ingest_pb2.SubmitRequest
        self._spec = task_pb2.TaskSpec

    def submit(self, batch: Sequence[tuple[int, int]]) -> None:
        request = self._request()
        add = request.tasks.add
        for seq, fire_at_ms in batch:
            spec = add(queue=QUEUE, payload=encode_payload(seq, fire_at_ms))
            spec.fire_at.seconds, rem = divmod(fire_at_ms, 1000)
            spec.fire_at.nanos = rem * 1_000_000
        backoff = 0.01
        while True:
            try:
                response = self._submit(request, timeout=60)
                break
            except self._grpc.RpcError as exc:
                if exc.code() not in (self._grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      self._grpc.StatusCode.UNAVAILABLE):
                    raise
                time.sleep(backoff)  # backpressure: the harness's achieved rate shows it
                backoff = min(backoff * 2, 0.5)
        refused = [r.error for r in response.results if r.code != 0]
        if refused:
            raise RuntimeError(f"{len(refused)} tasks refused, e.g. {refused[0]}")

    def close(self) -> None:
        self._channel.close()


def _worker_main(target: str, run_dir: str, max_in_flight: int, ready) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(_consume(target, run_dir, max_in_flight, ready))


async def _consume(target: str, run_dir: str, max_in_flight: int, ready) -> None:
    import grpc

    from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc

    log = ReceiptLog.for_current_process(receipts_dir(run_dir))
    outbox: asyncio.Queue = asyncio.Queue()
    outbox.put_nowait(dispatch_pb2.ConsumeRequest(
        subscribe=dispatch_pb2.Subscribe(queue=QUEUE, max_in_flight=max_in_flight)))

    async def requests():
        while True:
            yield await outbox.get()

    while True:
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                call = dispatch_pb2_grpc.DispatchStub(channel).Consume(requests())
                ready.set()
                async for response in call:
                    deliveries = response.deliveries
                    log.record_many([decode_payload(d.payload) for d in deliveries],
                                    [d.fired_at.seconds * 1000 + d.fired_at.nanos / 1e6 for d in deliveries])
                    outbox.put_nowait(dispatch_pb2.ConsumeRequest(
                        ack=dispatch_pb2.Ack(delivery_ids=[d.delivery_id for d in deliveries])))
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
            outbox = asyncio.Queue()
            outbox.put_nowait(dispatch_pb2.ConsumeRequest(
                subscribe=dispatch_pb2.Subscribe(queue=QUEUE, max_in_flight=max_in_flight)))


class TaskwheelDriver(Driver):
    name = "taskwheel"

    def setup(self) -> None:
        self.mode = self.options.get("mode", "one")
        self.workers = int(self.options.get("workers", "1"))
        self.max_in_flight = int(self.options.get("max_in_flight", "10000"))
        store = self.options.get("store", "")
        extra = self.options.get("server_args", "").split()
        self._procs: dict[str, subprocess.Popen] = {}
        self._worker_procs: list = []
        self.nodes = int(self.options.get("nodes", "1"))
        if self.mode == "one":
            self.targets = []
            for i in range(self.nodes):
                target = f"127.0.0.1:{_free_port()}"
                args = ["up", "--listen", target, "--data-dir", str(self.run_dir / f"data{i or ''}")]
                if store:
                    args += ["--store", store]
                self._start("taskwheel" if self.nodes == 1 else f"node{i}", args + extra)
                self.targets.append(target)
            self.ingest_target = self.dispatch_target = self.targets[0]
        else:
            ports = {role: _free_port() for role in ("ingest", "timer", "dispatch")}
            t = {role: f"127.0.0.1:{p}" for role, p in ports.items()}
            store = store or str(self.run_dir / "tasks.db")
            self.ingest_target, self.dispatch_target = t["ingest"], t["dispatch"]
            self.targets = [t["ingest"]]
            for role in ("dispatch", "timer", "ingest"):
                # They find each other in the store.
                self._start(role, ["serve", role, "--listen", t[role], "--store", store] + extra)
        ctx = mp.get_context("spawn")
        for i in range(self.workers):
            ready = ctx.Event()
            target = self.targets[i % len(self.targets)] if self.mode == "one" else self.dispatch_target
            proc = ctx.Process(target=_worker_main, daemon=True,
                               args=(target, str(self.run_dir), self.max_in_flight, ready))
            proc.start()
            if not ready.wait(READY_TIMEOUT_S):
                raise RuntimeError("a taskwheel worker did not connect")
            self._worker_procs.append(proc)

    def _start(self, label: str, args: list[str]) -> None:
        log = open(self.run_dir / f"{label}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "taskwheel.cli.main", *args],
                                stdout=subprocess.PIPE, stderr=log)
        self._procs[label] = proc
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if b"serving on" in line:
                return
            if not line and proc.poll() is not None:
                break
        raise RuntimeError(f"taskwheel {label} did not start; see {self.run_dir / (label + '.log')}")

    def connect(self, index: int = 0) -> Submitter:
        # The submitter processes take the nodes in turn.
        return TaskwheelSubmitter(self.targets[index % len(self.targets)])

    def server_pids(self) -> dict[str, int]:
        return {label: p.pid for label, p in self._procs.items() if p.poll() is None}

    def pending(self) -> int | None:
        import grpc

        from taskwheel.v1 import ingest_pb2, ingest_pb2_grpc

        try:
            with grpc.insecure_channel(self.ingest_target) as ch:
                stats = ingest_pb2_grpc.IngestStub(ch).Stats(ingest_pb2.StatsRequest(), timeout=5)
            return stats.scheduled
        except grpc.RpcError:
            return None

    def describe(self) -> dict[str, str]:
        import grpc as grpc_mod

        import taskwheel
        return {"taskwheel": taskwheel.__version__, "grpcio": grpc_mod.__version__,
                "mode": self.mode, "workers": str(self.workers), "nodes": str(self.nodes),
                "store": self.options.get("store", "embedded sqlite")}

    def teardown(self) -> None:
        for proc in getattr(self, "_worker_procs", []):
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
        for proc in getattr(self, "_procs", {}).values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
