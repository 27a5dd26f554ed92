"""Cassandra stopped and restarted under load, with its own server (the shared one stays up)."""
import threading
import time

import grpc
import pytest

from taskwheel.stores.cassandra import devserver
from taskwheel.v1 import ingest_pb2
from tests.e2e.harness import QueueWorker, ServerProcess, free_port, ingest, now_ms, spec

pytestmark = [pytest.mark.slow, pytest.mark.cassandra]


def test_ingest_answers_unavailable_while_cassandra_is_down_and_nothing_accepted_is_lost(tmp_path):
    cass_dir = tmp_path / "cassandra"
    ports = devserver.start(cass_dir, fast=False, heap="1G")
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = ServerProcess(
        ["up", "--listen", target, "--data-dir", str(tmp_path / "data"),
         "--store", f"cassandra://127.0.0.1:{ports.cql}/outage?shards=4"],
        str(tmp_path / "server.log")).start()
    accepted: set[str] = set()
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load() -> None:
        stub = ingest(target)
        while not stop.is_set():
            specs = [spec("outage", fire_at_ms=now_ms() + 1500 + i) for i in range(200)]
            try:
                results = stub.Submit(ingest_pb2.SubmitRequest(tasks=specs), timeout=15).results
                accepted.update(r.task_id for r in results if r.code == 0)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
            time.sleep(0.05)

    loader = threading.Thread(target=load, daemon=True)
    try:
        with QueueWorker(target, "outage") as worker:
            loader.start()
            time.sleep(3)
            devserver.stop(cass_dir)
            time.sleep(4)
            down = [c for c in codes[-10:]]
            devserver.start(cass_dir, heap="1G")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and codes[-1] != grpc.StatusCode.OK:
                time.sleep(0.5)
            time.sleep(3)
            stop.set()
            loader.join(20)
            worker.wait_for(len(accepted), timeout=60)
            time.sleep(1)
            delivered = {r.task_id for r in worker.snapshot()}
    finally:
        stop.set()
        server.stop()
        devserver.stop(cass_dir)
    assert grpc.StatusCode.UNAVAILABLE in down, f"while Cassandra was down Submit said {set(down)}"
    assert codes[-1] == grpc.StatusCode.OK, "ingest did not recover after Cassandra came back"
    missing = accepted - delivered
    assert not missing, f"{len(missing)} of {len(accepted)} accepted tasks never delivered"
