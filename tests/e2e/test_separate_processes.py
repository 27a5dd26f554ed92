"""The production shape: ingest, timer and dispatch each in its own process, talking gRPC."""
import time

import pytest

from taskwheel.v1 import ingest_pb2
from tests.e2e.harness import ServerProcess, QueueWorker, free_port, ingest, now_ms, spec

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path, store_url):
    ports = {role: free_port() for role in ("ingest", "timer", "dispatch")}
    targets = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    procs = {}
    for role in ("dispatch", "timer", "ingest"):
        # They find each other in the store. The timer keeps its node id across a restart, so
        # it takes its shards back at once instead of after their leases lapse.
        named = ["--node-id", "the-timer"] if role == "timer" else []
        procs[role] = ServerProcess(["serve", role, "--listen", targets[role], "--store", store_url, *named],
                                    str(tmp_path / f"{role}.log"))
        procs[role].target = targets[role]
        procs[role].start()
    yield procs
    for proc in procs.values():
        proc.stop()


def test_tasks_flow_from_ingest_through_timer_to_dispatch_in_separate_processes(cluster):
    stub = ingest(cluster["ingest"].target)
    due = now_ms() + 1000
    specs = [spec("split", fire_at_ms=due + i) for i in range(1000)]
    results = stub.Submit(ingest_pb2.SubmitRequest(tasks=specs), timeout=30).results
    with QueueWorker(cluster["dispatch"].target, "split") as worker:
        got = worker.wait_for(1000, timeout=20)
        time.sleep(0.5)
        got = worker.snapshot()
    assert sorted(r.task_id for r in got) == sorted(r.task_id for r in results)
    assert all(r.received_ms >= r.fire_at_ms for r in got)


def test_a_killed_dispatch_process_loses_nothing_the_timer_fired(cluster, tmp_path):
    stub = ingest(cluster["ingest"].target)
    due = now_ms() + 500
    results = stub.Submit(ingest_pb2.SubmitRequest(
        tasks=[spec("dkill", fire_at_ms=due + i * 2) for i in range(500)]), timeout=30).results
    cluster["dispatch"].kill()
    time.sleep(2.0)  # everything falls due while dispatch is down
    cluster["dispatch"].start()
    with QueueWorker(cluster["dispatch"].target, "dkill") as worker:
        worker.wait_for(500, timeout=30)
        time.sleep(0.5)
        got = {r.task_id for r in worker.snapshot()}
    assert got == {r.task_id for r in results}


def test_a_timer_killed_mid_minute_fires_the_rest_of_the_bucket_after_restart(cluster):
    stub = ingest(cluster["ingest"].target)
    start = now_ms() + 1000
    # Due over 8 s: some before the kill, some while the timer is down, some after its restart.
    results = stub.Submit(ingest_pb2.SubmitRequest(
        tasks=[spec("tkill", fire_at_ms=start + i * 8) for i in range(1000)]), timeout=30).results
    with QueueWorker(cluster["dispatch"].target, "tkill") as worker:
        time.sleep(3.0)
        cluster["timer"].kill()
        before = len(worker.snapshot())
        time.sleep(2.0)
        cluster["timer"].start()
        worker.wait_for(1000, timeout=40)
        time.sleep(0.5)
        got = worker.snapshot()
    assert 0 < before < 1000, "the kill was meant to land mid-stream"
    assert {r.task_id for r in got} == {r.task_id for r in results}
    assert all(r.received_ms >= r.fire_at_ms for r in got)
