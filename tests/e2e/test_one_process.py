"""End to end on each store: real `taskwheel up` processes, real gRPC clients."""
import collections
import time

import grpc
import pytest

from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc, ingest_pb2, task_pb2
from tests.e2e.harness import ServerProcess, QueueWorker, free_port, ingest, now_ms, spec

pytestmark = pytest.mark.slow


def submit(stub, specs):
    results = []
    for i in range(0, len(specs), 1000):
        results.extend(stub.Submit(ingest_pb2.SubmitRequest(tasks=specs[i:i + 1000]), timeout=30).results)
    return results


def test_ten_thousand_tasks_spread_over_seconds_arrive_once_and_never_early(server):
    stub = ingest(server.target)
    start = now_ms() + 1500
    specs = [spec("bulk", fire_at_ms=start + (i * 3000) // 10_000, payload=str(i).encode())
             for i in range(10_000)]
    with QueueWorker(server.target, "bulk") as worker:
        results = submit(stub, specs)
        assert all(r.code == 0 for r in results)
        got = worker.wait_for(10_000, timeout=30)
        time.sleep(0.5)
        got = worker.snapshot()
    ids = [r.task_id for r in got]
    assert len(got) == 10_000
    assert len(set(ids)) == 10_000, "a task was delivered twice"
    assert set(ids) == {r.task_id for r in results}
    early = [r for r in got if r.received_ms < r.fire_at_ms]
    assert not early, f"{len(early)} tasks arrived before their fire time"


def test_kill_minus_nine_mid_load_loses_no_accepted_task(tmp_path, store_url):
    port = free_port()
    target = f"127.0.0.1:{port}"
    # After a crash, unacked deliveries return when their lease expires and tasks that were
    # waiting for a worker when their hold row fires: short ones keep the test short.
    args = ["up", "--data-dir", str(tmp_path / "data"), "--store", store_url, "--listen", target,
            "--default-lease-ms", "3000", "--hold-ms", "3000"]
    server = ServerProcess(args, str(tmp_path / "server.log")).start()
    stub = ingest(target)
    accepted = set()
    base = now_ms()
    try:
        # Some due during the outage, some before it, some after the restart.
        for batch in range(20):
            specs = [spec("crash", fire_at_ms=base + 500 + batch * 150 + i % 500) for i in range(500)]
            results = stub.Submit(ingest_pb2.SubmitRequest(tasks=specs), timeout=30).results
            accepted.update(r.task_id for r in results if r.code == 0)
        with QueueWorker(target, "crash") as worker:
            worker.wait_for(2000, timeout=10)
            server.kill()
        before = {r.task_id for r in worker.snapshot()}
        server.start()
        with QueueWorker(target, "crash") as worker:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and accepted - before - {r.task_id for r in worker.snapshot()}:
                time.sleep(0.2)
            after = {r.task_id for r in worker.snapshot()}
    finally:
        server.stop()
    assert len(accepted) == 10_000
    missing = accepted - before - after
    if missing:
        server.start()
        stub = ingest(target)
        states = collections.Counter(
            (t.state, t.attempt) for t in (stub.Get(ingest_pb2.GetRequest(task_id=i)) for i in list(missing)[:50]))
        server.stop()
        raise AssertionError(f"{len(missing)} accepted tasks never delivered after kill -9; (state, attempt): {states}")


def test_unacked_delivery_is_redelivered_after_its_lease_with_next_attempt(server):
    stub = ingest(server.target)
    s = spec("lease", delay_ms=0, lease={"nanos": 500_000_000})
    task_id = stub.Submit(ingest_pb2.SubmitRequest(tasks=[s])).results[0].task_id
    with QueueWorker(server.target, "lease", mode="hold") as holder:
        first = holder.wait_for(1, timeout=10)
        assert [r.attempt for r in first] == [1]
        second = holder.wait_for(2, timeout=10)
    assert [(r.task_id, r.attempt) for r in second] == [(task_id, 1), (task_id, 2)]
    # The server times the 500 ms lease from its send; the worker's receipts each come a few
    # ms after a send, so their gap may fall a little short of the lease (494-499 ms seen).
    assert second[1].received_ms - second[0].received_ms >= 450
    # The store shows a delivery once its lease is written (lease_write_delay_ms later).
    deadline = time.monotonic() + 5
    while stub.Get(ingest_pb2.GetRequest(task_id=task_id)).attempt < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.Get(ingest_pb2.GetRequest(task_id=task_id)).attempt == 2


def test_nack_retries_until_max_attempts_then_the_task_ends_failed(server):
    stub = ingest(server.target)
    task_id = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("flaky", max_attempts=3)])).results[0].task_id
    with QueueWorker(server.target, "flaky", mode="nack") as worker:
        got = worker.wait_for(3, timeout=15)
        time.sleep(1.0)
        got = worker.snapshot()
    assert [r.attempt for r in got] == [1, 2, 3]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        task = stub.Get(ingest_pb2.GetRequest(task_id=task_id))
        if task.state == task_pb2.TASK_STATE_FAILED:
            break
        time.sleep(0.1)
    assert task.state == task_pb2.TASK_STATE_FAILED
    assert task.last_error == "handler failed"


def test_acked_task_ends_succeeded_and_is_not_redelivered(server):
    stub = ingest(server.target)
    s = spec("ok", lease={"nanos": 300_000_000})
    task_id = stub.Submit(ingest_pb2.SubmitRequest(tasks=[s])).results[0].task_id
    with QueueWorker(server.target, "ok") as worker:
        worker.wait_for(1, timeout=10)
        time.sleep(1.5)  # well past the lease
        got = worker.snapshot()
    assert len(got) == 1
    assert stub.Get(ingest_pb2.GetRequest(task_id=task_id)).state == task_pb2.TASK_STATE_SUCCEEDED


def test_cancel_before_fire_prevents_delivery(server):
    stub = ingest(server.target)
    results = stub.Submit(ingest_pb2.SubmitRequest(
        tasks=[spec("cancel", delay_ms=1500), spec("cancel", delay_ms=1500)])).results
    cancelled = stub.Cancel(ingest_pb2.CancelRequest(task_id=results[0].task_id))
    assert cancelled.task.state == task_pb2.TASK_STATE_CANCELLED
    with QueueWorker(server.target, "cancel") as worker:
        worker.wait_for(1, timeout=10)
        time.sleep(1.0)
        got = worker.snapshot()
    assert [r.task_id for r in got] == [results[1].task_id]
    with pytest.raises(grpc.RpcError) as err:
        stub.Cancel(ingest_pb2.CancelRequest(task_id=results[1].task_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_duplicate_idempotency_key_returns_the_first_task_and_schedules_nothing(server):
    stub = ingest(server.target)
    first = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("idem", idempotency_key="order-42")])).results[0]
    again = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("idem", idempotency_key="order-42")])).results[0]
    assert not first.duplicate and again.duplicate
    assert again.task_id == first.task_id
    with QueueWorker(server.target, "idem") as worker:
        worker.wait_for(1, timeout=10)
        time.sleep(1.0)
        assert len(worker.snapshot()) == 1


@pytest.mark.parametrize("bad, field", [
    (task_pb2.TaskSpec(queue=""), "queue"),
    (task_pb2.TaskSpec(queue="has space"), "queue"),
    (task_pb2.TaskSpec(queue="q", payload=b"x" * 70_000), "payload"),
    (spec("q", fire_at_ms=now_ms() + 400 * 86_400_000), "fire_at"),
    (spec("q", fire_at_ms=now_ms() - 3 * 86_400_000), "fire_at"),
    (task_pb2.TaskSpec(queue="q", max_attempts=1000), "max_attempts"),
    (task_pb2.TaskSpec(queue="q", lease={"nanos": 1000}), "lease"),
])
def test_a_bad_task_gets_invalid_argument_naming_the_field_and_the_rest_is_accepted(server, bad, field):
    stub = ingest(server.target)
    results = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("fine"), bad])).results
    assert results[0].code == 0 and results[0].task_id
    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field in results[1].error and not results[1].task_id


@pytest.mark.parametrize("count", [0, 10_001])
def test_an_empty_or_oversized_batch_is_rejected_whole(server, count):
    stub = ingest(server.target)
    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("q")] * count))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tasks" in err.value.details()


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\xff\xff\xff", b"\x0a\x03\x0a\x01\xc3"],
                         ids=["cut-short", "not-protobuf", "queue-not-utf8"])
def test_bytes_that_are_not_a_submit_request_get_invalid_argument(server, raw):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/taskwheel.v1.Ingest/Submit")(raw, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SubmitRequest" in err.value.details()


def test_a_submit_of_valid_tasks_gets_each_ones_id_and_fire_time_back(server):
    fire_at = now_ms() + 3_600_000
    specs = [spec("q", fire_at_ms=fire_at + i) for i in range(3)] + [task_pb2.TaskSpec(queue="q")]
    results = submit(ingest(server.target), specs)
    assert [r.code for r in results] == [0] * 4 and len({r.task_id for r in results}) == 4
    assert [r.fire_at.seconds * 1000 + r.fire_at.nanos // 1_000_000 for r in results[:3]] == [
        fire_at, fire_at + 1, fire_at + 2]
    assert abs(results[3].fire_at.seconds * 1000 - now_ms()) < 60_000  # no fire time: now


def test_get_and_cancel_of_an_unknown_task_are_not_found(server):
    stub = ingest(server.target)
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(ingest_pb2.GetRequest(task_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Cancel(ingest_pb2.CancelRequest(task_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_consume_must_start_with_subscribe(server):
    stub = dispatch_pb2_grpc.DispatchStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Consume(iter([dispatch_pb2.ConsumeRequest(ack=dispatch_pb2.Ack(delivery_ids=["x"]))])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subscribe" in err.value.details()


def test_a_worker_never_has_more_unacked_deliveries_than_max_in_flight(server):
    stub = ingest(server.target)
    stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("window") for _ in range(50)]))
    with QueueWorker(server.target, "window", max_in_flight=7, mode="hold") as worker:
        worker.wait_for(7, timeout=10)
        time.sleep(1.0)
        assert len(worker.snapshot()) == 7


def test_health_and_reflection_answer_for_every_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    services = ("taskwheel.v1.Ingest", "taskwheel.v1.Dispatch",
                "taskwheel.internal.v1.Timer", "taskwheel.internal.v1.Dispatch")
    for name in ("", *services):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert set(services) <= names


def test_a_disconnected_workers_deliveries_are_redelivered_long_before_their_lease_expires(server):
    stub = ingest(server.target)
    task_id = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("gone")])).results[0].task_id
    with QueueWorker(server.target, "gone", mode="hold") as first:
        assert len(first.wait_for(1, timeout=10)) == 1
    started = now_ms()
    with QueueWorker(server.target, "gone") as second:
        got = second.wait_for(1, timeout=15)
    assert [(r.task_id, r.attempt) for r in got] == [(task_id, 2)]
    assert got[0].received_ms - started < 10_000  # the lease is 30 s


def test_an_ack_sent_on_a_new_stream_after_a_reconnect_is_honoured(server):
    stub = ingest(server.target)
    task_id = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("reconnect")])).results[0].task_id
    with QueueWorker(server.target, "reconnect", mode="hold") as first:
        delivery = first.wait_for(1, timeout=10)[0]
    with QueueWorker(server.target, "reconnect", mode="hold") as second:
        second.ack([delivery.delivery_id])
        time.sleep(4)  # past the orphan grace
        assert second.snapshot() == []
    assert stub.Get(ingest_pb2.GetRequest(task_id=task_id)).state == task_pb2.TASK_STATE_SUCCEEDED


def test_a_saturated_ingest_answers_resource_exhausted_with_a_retry_hint_and_loses_nothing(tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = ServerProcess(["up", "--data-dir", str(tmp_path / "data"), "--listen", target,
                            "--max-pending-writes", "1500", "--write-batch", "1000"],
                           str(tmp_path / "server.log")).start()
    try:
        stub = ingest(target)
        refused, accepted = [], []
        for _ in range(5):
            calls = [stub.Submit.future(ingest_pb2.SubmitRequest(tasks=[spec("busy", delay_ms=60_000)] * 1000))
                     for _ in range(12)]
            for call in calls:
                try:
                    accepted.extend(r.task_id for r in call.result(timeout=30).results)
                except grpc.RpcError as exc:
                    refused.append(exc)
            if refused:
                break
        assert refused, "12 concurrent batches of 1000 never filled a queue of 1500"
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            hint = dict(exc.trailing_metadata())["retry-after-ms"]
            assert int(hint) > 0
        stats = stub.Stats(ingest_pb2.StatsRequest())
        assert stats.scheduled == len(accepted)
    finally:
        server.stop()


def test_a_task_waiting_for_a_worker_is_held_durably_and_survives_kill_minus_nine(tmp_path, store_url):
    port = free_port()
    target = f"127.0.0.1:{port}"
    args = ["up", "--data-dir", str(tmp_path / "data"), "--store", store_url, "--listen", target,
            "--hold-after-ms", "300", "--hold-ms", "2000"]
    server = ServerProcess(args, str(tmp_path / "server.log")).start()
    try:
        stub = ingest(target)
        task_id = stub.Submit(ingest_pb2.SubmitRequest(tasks=[spec("nobody")])).results[0].task_id
        deadline = time.monotonic() + 10
        task = stub.Get(ingest_pb2.GetRequest(task_id=task_id))
        while time.monotonic() < deadline and task.due_at.seconds * 1000 + task.due_at.nanos // 10**6 <= \
                task.fire_at.seconds * 1000 + task.fire_at.nanos // 10**6:
            time.sleep(0.1)
            task = stub.Get(ingest_pb2.GetRequest(task_id=task_id))
        # Held: no attempt used, due again hold_ms after it fired.
        assert task.state == task_pb2.TASK_STATE_SCHEDULED and task.attempt == 1
        assert task.due_at.ToMilliseconds() > task.fire_at.ToMilliseconds() + 1000
        server.kill()
        server.start()
        with QueueWorker(target, "nobody") as worker:
            got = worker.wait_for(1, timeout=30)
        assert [(r.task_id, r.attempt) for r in got] == [(task_id, 1)]
    finally:
        server.stop()
