"""Failover time of a taskwheel cluster: kill -9 a node, time until the survivors own its shards.

Starts ``--nodes`` ``taskwheel up`` processes on a fresh keyspace of the Cassandra at
``--cassandra`` (start one with ``taskwheel dev cassandra start``), with the shard lease settings
given, and a light load (``--rate`` tasks/s, due a second ahead, through every node). Then,
``--kills`` times, kills one node (each in turn), polls the survivors' Timer.Status every 50 ms
until they hold every shard, and starts the node again. Prints each failover and writes them
as JSON. Not a test: it asserts nothing; docs/performance.md quotes its figures.

    .venv/bin/python perf/bench_failover.py --cassandra 127.0.0.1:19042 --renew-ms 500 --lease-ms 2000
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc

from taskwheel.internal.v1 import timer_pb2, timer_pb2_grpc
from taskwheel.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, args: list[str], log: Path):
        self.target = f"127.0.0.1:{free_port()}"
        self.args = ["up", "--listen", self.target, *args]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "taskwheel.cli.main", *self.args],
                                     stdout=subprocess.PIPE, stderr=open(self.log, "ab"))
        while b"serving on" not in self.proc.stdout.readline():
            if self.proc.poll() is not None:
                raise RuntimeError(f"a node did not start; see {self.log}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def shards(self) -> int:
        try:
            with grpc.insecure_channel(self.target) as ch:
                return timer_pb2_grpc.TimerStub(ch).Status(timer_pb2.TimerStatusRequest(), timeout=1).shards
        except grpc.RpcError:
            return 0


def until(condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def balanced(nodes: list[Node], shards: int) -> bool:
    """Every shard owned, and each node's share within one of the others'."""
    held = [n.shards() for n in nodes]
    return sum(held) == shards and max(held) - min(held) <= 1


def load(targets: list[str], rate: int, stop: threading.Event) -> None:
    stubs = [ingest_pb2_grpc.IngestStub(grpc.insecure_channel(t)) for t in targets]
    turn = 0
    while not stop.is_set():
        due = time.time_ns() // 1_000_000 + 1_000
        spec = task_pb2.TaskSpec(queue="failover", payload=b"x")
        spec.fire_at.FromMilliseconds(due)
        try:
            stubs[turn % len(stubs)].Submit(ingest_pb2.SubmitRequest(tasks=[spec] * max(1, rate // 10)), timeout=5)
        except grpc.RpcError:
            pass  # a node being killed: the next call goes to another
        turn += 1
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cassandra", required=True, help="host:port")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--renew-ms", type=int, default=1_000)
    parser.add_argument("--lease-ms", type=int, default=5_000)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    store = f"cassandra://{args.cassandra}/failover_{uuid.uuid4().hex[:10]}?shards={args.shards}"
    logs = Path(tempfile.mkdtemp(prefix="taskwheel-failover-"))
    flags = ["--store", store, "--shard-renew-ms", str(args.renew_ms), "--shard-lease-ms", str(args.lease_ms)]
    nodes = [Node(flags + ["--data-dir", str(logs / f"n{i}")], logs / f"n{i}.log") for i in range(args.nodes)]
    for node in nodes:
        node.start()
    stop = threading.Event()
    feeder = threading.Thread(target=load, args=([n.target for n in nodes], args.rate, stop), daemon=True)
    failovers = []
    try:
        until(lambda: balanced(nodes, args.shards), 60)
        feeder.start()
        for kill in range(args.kills):
            time.sleep(1.0)
            victim = nodes[kill % len(nodes)]
            survivors = [n for n in nodes if n is not victim]
            held = [n.shards() for n in nodes]
            victim.kill()
            failovers.append(until(lambda: sum(n.shards() for n in survivors) == args.shards, 30))
            print(f"kill {kill + 1}: the survivors own every shard after {failovers[-1]:.2f} s "
                  f"(shards held just before, node {kill % len(nodes)} killed: {held})", flush=True)
            victim.start()
            until(lambda: balanced(nodes, args.shards), 60)
    finally:
        stop.set()
        for node in nodes:
            if node.proc and node.proc.poll() is None:
                node.proc.terminate()
                node.proc.wait(15)
    result = {"renew_ms": args.renew_ms, "lease_ms": args.lease_ms, "nodes": args.nodes, "shards": args.shards,
              "failovers_s": [round(f, 3) for f in failovers]}
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
