"""Real taskwheel server processes and a plain-gRPC test worker, for the end-to-end tests."""
from __future__ import annotations

import collections
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc, ingest_pb2, ingest_pb2_grpc, task_pb2

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ServerProcess:
    """``taskwheel up`` or ``taskwheel serve ROLE`` as a child process."""

    def __init__(self, args: list[str], log_path: str, env: dict | None = None,
                 stdout_path: str | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.stdout_path = stdout_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "ServerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "taskwheel.cli.main", *self.args],
            stdout=subprocess.PIPE, stderr=log, env=self.env,
        )
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if b"serving on" in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            if not line and self.proc.poll() is not None:
                break
        self.kill()
        with open(self.log_path, "rb") as f:
            tail = f.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"server {self.args} did not start: {line!r}\n{tail}")

    def _drain(self) -> None:
        out = open(self.stdout_path, "ab") if self.stdout_path else None
        for line in self.proc.stdout:
            if out:
                out.write(line)
                out.flush()

    def kill(self) -> None:
        """kill -9: no chance to flush or checkpoint."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def spec(queue_name: str, *, fire_at_ms: int | None = None, delay_ms: int | None = None, payload=b"",
         **fields) -> task_pb2.TaskSpec:
    s = task_pb2.TaskSpec(queue=queue_name, payload=payload, **fields)
    if fire_at_ms is not None:
        s.fire_at.seconds, rem = divmod(fire_at_ms, 1000)
        s.fire_at.nanos = rem * 1_000_000
    if delay_ms is not None:
        s.delay.seconds, rem = divmod(delay_ms, 1000)
        s.delay.nanos = rem * 1_000_000
    return s


def ingest(target: str) -> ingest_pb2_grpc.IngestStub:
    return ingest_pb2_grpc.IngestStub(grpc.insecure_channel(target))


@dataclass
class Received:
    task_id: str
    delivery_id: str
    attempt: int
    fire_at_ms: int
    received_ms: int
    payload: bytes
    redelivered: bool = False
    owner_epoch: int = 0


@dataclass
class QueueWorker:
    """Consumes a queue over a raw Consume stream; acks, nacks, or holds deliveries forever."""

    target: str
    queue: str
    max_in_flight: int = 1000
    mode: str = "ack"  # "ack" | "nack" | "hold"
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._channel = grpc.insecure_channel(self.target)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: Exception | None = None

    def __enter__(self) -> "QueueWorker":
        self._requests.put(dispatch_pb2.ConsumeRequest(
            subscribe=dispatch_pb2.Subscribe(queue=self.queue, max_in_flight=self.max_in_flight)))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._requests.put(None)
        self._channel.close()
        self._thread.join(5)

    def _run(self) -> None:
        stub = dispatch_pb2_grpc.DispatchStub(self._channel)
        try:
            # Waits for the server: a channel to an address that just refused (a node restarting
            # on its port) would otherwise fail at once.
            for response in stub.Consume(iter(self._requests.get, None), wait_for_ready=True):
                now = now_ms()
                ids = []
                with self._lock:
                    for d in response.deliveries:
                        self.received.append(Received(
                            d.task_id, d.delivery_id, d.attempt,
                            d.fire_at.seconds * 1000 + d.fire_at.nanos // 1_000_000, now, d.payload,
                            d.redelivered, d.owner_epoch))
                        ids.append(d.delivery_id)
                if self.mode == "ack":
                    self._requests.put(dispatch_pb2.ConsumeRequest(ack=dispatch_pb2.Ack(delivery_ids=ids)))
                elif self.mode == "nack":
                    self._requests.put(dispatch_pb2.ConsumeRequest(
                        nack=dispatch_pb2.Nack(delivery_ids=ids, error="handler failed",
                                               retry_after={"nanos": 100_000_000})))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def ack(self, delivery_ids) -> None:
        self._requests.put(dispatch_pb2.ConsumeRequest(ack=dispatch_pb2.Ack(delivery_ids=list(delivery_ids))))

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, count: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.snapshot()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        return self.snapshot()


# What ingest says when a refused Submit certainly stored nothing (ingest/servicer.py).
NOTHING_STORED = "none of these tasks will run"


class Load:
    """Submits ``rate`` tasks/s in batches every 100 ms through the targets in turn, each task due
    1-2 s after its submit with a payload of its own, and sorts every task by its Submit's answer:
    ``accepted`` (task id -> fire_at_ms, and ``accepted_payloads``: payload -> task id), refused
    for certain (``refused``: payload -> the status details) or perhaps stored (``maybe``)."""

    def __init__(self, targets: list[str], queue: str, rate: int, lease_s: int = 2):
        self.targets = list(targets)
        self.queue = queue
        self.lease_s = lease_s
        self.per_batch = max(1, rate // 10)
        self.accepted: dict[str, int] = {}
        self.accepted_payloads: dict[bytes, str] = {}
        self.refused: dict[bytes, str] = {}
        self.maybe: dict[bytes, str] = {}
        self.codes: collections.Counter = collections.Counter()
        self.retry_after_ms: list[int] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def failed(self) -> int:
        """Tasks whose Submit did not answer OK."""
        return len(self.refused) + len(self.maybe)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        channels = [grpc.insecure_channel(target) for target in self.targets]
        stubs = [ingest_pb2_grpc.IngestStub(channel) for channel in channels]
        for turn in itertools.count():
            if self._stop.is_set():
                break
            started = time.monotonic()
            now = now_ms()
            specs = [spec(self.queue, payload=b"%s-%d" % (self.queue.encode(), next(self._seq)),
                          fire_at_ms=now + 1_000 + (i * 1_000) // self.per_batch,
                          lease={"seconds": self.lease_s}) for i in range(self.per_batch)]
            try:
                results = stubs[turn % len(stubs)].Submit(ingest_pb2.SubmitRequest(tasks=specs), timeout=10).results
                for s, r in zip(specs, results):
                    self.accepted[r.task_id] = ms_of(s.fire_at)
                    self.accepted_payloads[s.payload] = r.task_id
                self.codes["OK"] += 1
            except grpc.RpcError as e:  # nothing of a failed call counts as accepted
                self.codes[e.code().name] += 1
                kind = self.refused if NOTHING_STORED in (e.details() or "") else self.maybe
                for s in specs:
                    kind[s.payload] = e.details() or ""
                self.retry_after_ms += [int(v) for k, v in e.trailing_metadata() or () if k == "retry-after-ms"]
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
        for channel in channels:
            channel.close()


def ms_of(ts) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000
