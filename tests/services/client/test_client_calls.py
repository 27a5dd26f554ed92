"""Client and AsyncClient: how requests are shaped, how errors map, when calls are retried."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from taskwheel.client import (AsyncClient, Backpressure, Client, InvalidTask, RetryPolicy,
                              SubmitError, TaskEnded, TaskNotFound, TaskSpec, TaskState,
                              TaskwheelError, Unavailable)

FAST_RETRY = RetryPolicy(retries=5, initial_backoff=0.001, max_backoff=0.005)


@pytest.fixture
def client(fake):
    with Client(fake.target, retry=FAST_RETRY, timeout=5) as c:
        yield c


def only_spec(fake):
    (request,) = fake.ingest.submits
    (spec,) = request.tasks
    return spec


# -- request shaping --------------------------------------------------------------------------

def test_submit_returns_the_task_id_and_sends_every_field(client, fake):
    task_id = client.submit("emails", b"hi", idempotency_key="k1", max_attempts=7,
                            headers={"tenant": "a"}, lease=12.5)
    spec = only_spec(fake)
    assert task_id == "t1"
    assert (spec.queue, spec.payload, spec.idempotency_key, spec.max_attempts) == (
        "emails", b"hi", "k1", 7)
    assert dict(spec.headers) == {"tenant": "a"}
    assert (spec.lease.seconds, spec.lease.nanos) == (12, 500_000_000)


def test_submit_without_a_time_sets_neither_fire_at_nor_delay(client, fake):
    client.submit("q", b"")
    assert only_spec(fake).WhichOneof("when") is None


def test_str_payload_is_sent_as_utf8(client, fake):
    client.submit("q", "héllo")
    assert only_spec(fake).payload == "héllo".encode()


def test_aware_datetime_fire_at_is_sent_to_the_nanosecond_of_its_microsecond(client, fake):
    when = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    client.submit("q", b"", fire_at=when)
    spec = only_spec(fake)
    assert spec.WhichOneof("when") == "fire_at"
    assert spec.fire_at.seconds == int(when.timestamp())
    assert spec.fire_at.nanos == 123_456_000


def test_naive_datetime_fire_at_means_local_time(client, fake):
    when = datetime(2031, 5, 6, 7, 8, 9)
    client.submit("q", b"", fire_at=when)
    assert only_spec(fake).fire_at.seconds == int(when.timestamp())


def test_epoch_seconds_fire_at_keeps_its_fraction(client, fake):
    client.submit("q", b"", fire_at=1_900_000_000.25)
    spec = only_spec(fake)
    assert (spec.fire_at.seconds, spec.fire_at.nanos) == (1_900_000_000, 250_000_000)


def test_delay_in_seconds_is_sent_as_a_duration(client, fake):
    client.submit("q", b"", delay=1.5)
    spec = only_spec(fake)
    assert spec.WhichOneof("when") == "delay"
    assert (spec.delay.seconds, spec.delay.nanos) == (1, 500_000_000)


def test_delay_as_timedelta_is_sent_as_a_duration(client, fake):
    client.submit("q", b"", delay=timedelta(minutes=2, milliseconds=3))
    spec = only_spec(fake)
    assert (spec.delay.seconds, spec.delay.nanos) == (120, 3_000_000)


def test_fire_at_and_delay_together_are_refused_before_any_call(client, fake):
    with pytest.raises(ValueError, match="fire_at and delay"):
        client.submit("q", b"", fire_at=time.time(), delay=1)
    assert fake.ingest.submits == []


def test_submit_many_sends_batches_of_at_most_1000(client, fake):
    results = client.submit_many(TaskSpec("q", b"x") for _ in range(2500))
    assert [len(r.tasks) for r in fake.ingest.submits] == [1000, 1000, 500]
    assert [r.index for r in results] == list(range(2500))
    assert len({r.task_id for r in results}) == 2500


def test_submit_many_accepts_specs_messages_and_mappings(client, fake):
    from taskwheel.v1 import task_pb2
    results = client.submit_many([
        TaskSpec("a", b"1", delay=5),
        {"queue": "b", "payload": b"2", "fire_at": 2_000_000_000},
        task_pb2.TaskSpec(queue="c", payload=b"3"),
    ])
    (request,) = fake.ingest.submits
    assert [s.queue for s in request.tasks] == ["a", "b", "c"]
    assert [s.WhichOneof("when") for s in request.tasks] == ["delay", "fire_at", None]
    assert all(r.ok for r in results)


def test_submit_result_reports_the_resolved_fire_time(client):
    (result,) = client.submit_many([TaskSpec("q", fire_at=2_000_000_000.5)])
    assert result.fire_at == datetime.fromtimestamp(2_000_000_000.5, timezone.utc)


def test_duplicate_idempotency_key_returns_the_first_task(client):
    first = client.submit("q", b"", idempotency_key="once")
    (again,) = client.submit_many([TaskSpec("q", idempotency_key="once")])
    assert again.task_id == first and again.duplicate


# -- per-item and RPC errors ------------------------------------------------------------------

def test_submit_many_returns_refused_items_as_results_by_default(client):
    results = client.submit_many([TaskSpec("q"), TaskSpec("bad"), TaskSpec("q")])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert results[1].error == "queue: not allowed"
    assert results[1].task_id == ""


def test_submit_many_raises_for_refused_items_when_asked(client):
    with pytest.raises(SubmitError) as caught:
        client.submit_many([TaskSpec("q"), TaskSpec("bad")], raise_on_error=True)
    assert [r.index for r in caught.value.failed] == [1]
    assert len(caught.value.results) == 2
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_submit_of_a_refused_task_raises_invalid_task_naming_the_field(client):
    with pytest.raises(InvalidTask, match="queue"):
        client.submit("bad", b"")


def test_get_of_unknown_task_raises_task_not_found_with_its_code(client):
    with pytest.raises(TaskNotFound) as caught:
        client.get("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "task_id" in caught.value.details
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_get_returns_the_task_with_its_state_and_times(client):
    task_id = client.submit("q", b"p", fire_at=2_000_000_000, headers={"h": "v"})
    task = client.get(task_id)
    assert (task.task_id, task.queue, task.payload, task.state) == (
        task_id, "q", b"p", TaskState.SCHEDULED)
    assert task.fire_at == datetime.fromtimestamp(2_000_000_000, timezone.utc)
    assert task.headers == {"h": "v"}


def test_cancel_returns_the_cancelled_task(client):
    task_id = client.submit("q", b"")
    assert client.cancel(task_id).state == TaskState.CANCELLED


def test_cancel_of_an_ended_task_raises_task_ended(client):
    task_id = client.submit("q", b"")
    client.cancel(task_id)
    with pytest.raises(TaskEnded):
        client.cancel(task_id)


def test_stats_returns_counts_by_state(client):
    client.submit_many([TaskSpec("q"), TaskSpec("q")])
    stats = client.stats()
    assert (stats.scheduled, stats.store) == (2, "fake")


def test_unmapped_codes_raise_the_base_error_keeping_the_code(client, fake):
    fake.fail_next(grpc.StatusCode.PERMISSION_DENIED, "no")
    with pytest.raises(TaskwheelError) as caught:
        client.get("x")
    assert type(caught.value) is TaskwheelError
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


# -- retries ----------------------------------------------------------------------------------

def test_submit_retries_backpressure_waiting_the_servers_hint(client, fake):
    fake.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, "write queue full", retry_after_ms=60,
                   times=2)
    started = time.monotonic()
    task_id = client.submit("q", b"")
    assert task_id
    assert len(fake.ingest.submits) == 3
    assert time.monotonic() - started >= 0.12


def test_submit_raises_backpressure_with_retry_after_when_retries_run_out(fake):
    fake.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, "write queue full", retry_after_ms=20,
                   times=3)
    with Client(fake.target, retry=RetryPolicy(retries=1, initial_backoff=0.001)) as c:
        with pytest.raises(Backpressure) as caught:
            c.submit("q", b"")
    assert caught.value.retry_after == pytest.approx(0.02)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(fake.ingest.submits) == 2


def test_submit_retries_unavailable(client, fake):
    fake.fail_next(grpc.StatusCode.UNAVAILABLE, "store down", times=2)
    assert client.submit("q", b"")
    assert len(fake.ingest.submits) == 3


def test_submit_does_not_retry_invalid_argument(client, fake):
    fake.fail_next(grpc.StatusCode.INVALID_ARGUMENT, "tasks: too many")
    with pytest.raises(InvalidTask):
        client.submit("q", b"")
    assert len(fake.ingest.submits) == 1


def test_cancel_is_never_retried(client, fake):
    fake.fail_next(grpc.StatusCode.UNAVAILABLE, "store down")
    with pytest.raises(Unavailable):
        client.cancel("t1")
    assert fake.ingest.calls == ["Cancel"]


def test_get_retries_unavailable(client, fake):
    task_id = client.submit("q", b"")
    fake.fail_next(grpc.StatusCode.UNAVAILABLE, "store down")
    assert client.get(task_id).task_id == task_id
    assert fake.ingest.calls == ["Submit", "Get", "Get"]


def test_failed_batch_reports_the_results_of_batches_before_it(fake):
    fake.fail_submit_number(2, grpc.StatusCode.UNAVAILABLE)
    with Client(fake.target, retry=RetryPolicy(retries=0), max_batch=2) as c:
        with pytest.raises(Unavailable) as caught:
            c.submit_many([TaskSpec("q")] * 5)
    assert [r.index for r in caught.value.partial] == [0, 1]
    assert len(fake.ingest.submits) == 2


def test_unreachable_server_raises_unavailable_after_retries():
    with Client("127.0.0.1:1", retry=RetryPolicy(retries=2, initial_backoff=0.001),
                timeout=2) as c:
        with pytest.raises(Unavailable):
            c.submit("q", b"")


# -- AsyncClient ------------------------------------------------------------------------------

async def test_async_submit_many_sends_batches_of_at_most_1000_in_order(fake):
    async with AsyncClient(fake.target, retry=FAST_RETRY) as c:
        results = await c.submit_many([TaskSpec("q", str(i)) for i in range(2100)])
    assert sorted(len(r.tasks) for r in fake.ingest.submits) == [100, 1000, 1000]
    assert [r.index for r in results] == list(range(2100))
    payload_of = {t.task_id: t.payload for t in fake.ingest.tasks.values()}
    assert [payload_of[r.task_id] for r in results] == [str(i).encode() for i in range(2100)]


async def test_async_submit_retries_backpressure_and_returns_the_id(fake):
    fake.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_after_ms=30)
    started = time.monotonic()
    async with AsyncClient(fake.target, retry=FAST_RETRY) as c:
        task_id = await c.submit("q", b"", delay=timedelta(seconds=3))
    assert task_id
    assert time.monotonic() - started >= 0.03
    assert len(fake.ingest.submits) == 2
    assert fake.ingest.submits[1].tasks[0].delay.seconds == 3


async def test_async_errors_map_like_the_blocking_client(fake):
    async with AsyncClient(fake.target, retry=FAST_RETRY) as c:
        with pytest.raises(TaskNotFound):
            await c.get("nope")
        with pytest.raises(InvalidTask):
            await c.submit("bad", b"")
        task_id = await c.submit("q", b"")
        assert (await c.cancel(task_id)).state == TaskState.CANCELLED
        with pytest.raises(TaskEnded):
            await c.cancel(task_id)
        stats = await c.stats()
    assert stats.cancelled == 1


async def test_async_failed_batch_is_raised_with_the_other_batches_results(fake):
    async with AsyncClient(fake.target, retry=RetryPolicy(retries=0), max_batch=10,
                           concurrency=1) as c:
        fake.fail_next(grpc.StatusCode.UNAVAILABLE, "down")
        with pytest.raises(Unavailable) as caught:
            await c.submit_many([TaskSpec("q")] * 30)
    assert [r.index for r in caught.value.partial] == list(range(10, 30))
