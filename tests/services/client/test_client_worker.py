"""Worker: subscribe, bounded concurrency, batched acks and nacks, reconnects, clean stop."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from taskwheel import telemetry
from taskwheel.client import FailNow, RetryAfter, RetryPolicy, Worker

FAST_RECONNECT = RetryPolicy(retries=0, initial_backoff=0.01, max_backoff=0.05)


async def run_worker(fake, handler, body, **options):
    """Runs ``body(worker)`` with a started worker on queue "q", then stops it."""
    options.setdefault("reconnect", FAST_RECONNECT)
    worker = Worker(fake.target, "q", handler, **options)
    await worker.start()
    try:
        return await body(worker)
    finally:
        await worker.stop()


async def noop(delivery):
    pass


async def test_worker_subscribes_to_its_queue_with_max_in_flight(fake):
    async def body(worker):
        await fake.async_wait_until(lambda: fake.dispatch.streams)
    await run_worker(fake, noop, body, concurrency=3, max_in_flight=7)
    (stream,) = fake.dispatch.streams
    assert (stream.subscribe.queue, stream.subscribe.max_in_flight) == ("q", 7)


def test_max_in_flight_defaults_to_twice_the_concurrency(fake):
    assert Worker(fake.target, "q", noop, concurrency=5).max_in_flight == 10


async def test_every_delivery_is_handled_and_acked_once(fake):
    ids = fake.add_deliveries(300)
    seen = []

    async def handler(delivery):
        seen.append(delivery.delivery_id)

    async def body(worker):
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 300)
    await run_worker(fake, handler, body)
    assert sorted(seen) == sorted(ids)
    assert sorted(fake.dispatch.acked) == sorted(ids)
    assert fake.dispatch.nacked == []


async def test_handlers_run_at_most_concurrency_at_a_time(fake):
    fake.add_deliveries(40)
    running, peak = 0, 0

    async def handler(delivery):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    async def body(worker):
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 40)
    await run_worker(fake, handler, body, concurrency=4, max_in_flight=8)
    assert peak == 4
    assert fake.dispatch.streams[0].max_unacked <= 8


async def test_sync_handlers_run_in_threads_with_the_same_bound(fake):
    fake.add_deliveries(24)
    lock = threading.Lock()
    running, peak, threads = 0, 0, set()

    def handler(delivery):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        time.sleep(0.01)
        with lock:
            running -= 1

    async def body(worker):
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 24)
    await run_worker(fake, handler, body, concurrency=3)
    assert peak == 3
    assert threading.get_ident() not in threads


async def test_acks_go_out_in_messages_of_ack_batch_ids(fake):
    fake.add_deliveries(30)

    async def body(worker):
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 30)
    await run_worker(fake, noop, body, concurrency=30, ack_batch=10, ack_interval=60)
    assert [len(m) for m in fake.dispatch.ack_messages] == [10, 10, 10]


async def test_fewer_acks_than_a_batch_go_out_after_ack_interval(fake):
    fake.add_deliveries(3)

    async def body(worker):
        started = time.monotonic()
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 3)
        return time.monotonic() - started
    waited = await run_worker(fake, noop, body, ack_batch=100, ack_interval=0.05)
    assert fake.dispatch.ack_messages == [["d0", "d1", "d2"]]
    assert waited >= 0.04


async def test_exception_nacks_with_the_repr_of_the_exception(fake):
    fake.add_deliveries(1)

    async def handler(delivery):
        raise ValueError("bad payload")

    async def body(worker):
        await fake.async_wait_until(lambda: fake.dispatch.nacked)
    await run_worker(fake, handler, body)
    (nack,) = fake.dispatch.nack_messages
    assert list(nack.delivery_ids) == ["d0"]
    assert nack.error == "ValueError('bad payload')"
    assert not nack.no_retry and not nack.HasField("retry_after")
    assert fake.dispatch.acked == []


async def test_nacks_with_the_same_error_share_one_message(fake):
    fake.add_deliveries(5)

    async def handler(delivery):
        raise RuntimeError("down")

    async def body(worker):
        await fake.async_wait_until(lambda: len(fake.dispatch.nacked) == 5)
    await run_worker(fake, handler, body, ack_interval=0.05)
    (nack,) = fake.dispatch.nack_messages
    assert sorted(nack.delivery_ids) == ["d0", "d1", "d2", "d3", "d4"]


async def test_retry_after_nacks_with_the_chosen_delay(fake):
    fake.add_deliveries(1)

    async def handler(delivery):
        raise RetryAfter(1.5)

    async def body(worker):
        await fake.async_wait_until(lambda: fake.dispatch.nacked)
    await run_worker(fake, handler, body)
    (nack,) = fake.dispatch.nack_messages
    assert nack.retry_after.ToMilliseconds() == 1500 and not nack.no_retry


async def test_fail_now_nacks_without_retry(fake):
    fake.add_deliveries(1)

    def handler(delivery):
        raise FailNow("poison message")

    async def body(worker):
        await fake.async_wait_until(lambda: fake.dispatch.nacked)
    await run_worker(fake, handler, body)
    (nack,) = fake.dispatch.nack_messages
    assert nack.no_retry and "poison message" in nack.error


async def test_handler_receives_the_delivery_fields(fake):
    fake.add_deliveries(1)
    received = []

    async def handler(delivery):
        received.append(delivery)

    async def body(worker):
        await fake.async_wait_until(lambda: fake.dispatch.acked)
    await run_worker(fake, handler, body)
    (delivery,) = received
    assert (delivery.task_id, delivery.delivery_id, delivery.queue, delivery.payload) == (
        "task-d0", "d0", "q", b"0")
    assert (delivery.attempt, delivery.max_attempts, delivery.last_attempt) == (1, 3, False)
    assert delivery.fire_at_ms == 1_900_000_000_005
    assert delivery.fire_at == datetime.fromtimestamp(1_900_000_000.005, timezone.utc)


async def test_broken_stream_is_reopened_and_work_continues(fake):
    first = fake.add_deliveries(10, prefix="a")
    release = asyncio.Event()

    async def handler(delivery):
        if delivery.delivery_id.startswith("a"):
            await release.wait()

    async def body(worker):
        await fake.async_wait_until(lambda: worker.stats.running == 10)
        fake.break_streams()
        await fake.async_wait_until(lambda: len(fake.dispatch.streams) == 2)
        release.set()
        second = fake.add_deliveries(10, prefix="b")
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 20)
        return second
    second = await run_worker(fake, handler, body, concurrency=10)
    assert sorted(fake.dispatch.acked) == sorted(first + second)
    assert fake.dispatch.streams[0].broken
    assert fake.dispatch.streams[1].subscribe.queue == "q"


async def test_acks_of_deliveries_finished_while_disconnected_go_out_on_the_new_stream(fake):
    ids = fake.add_deliveries(10)
    release = asyncio.Event()

    async def handler(delivery):
        await release.wait()

    async def body(worker):
        await fake.async_wait_until(lambda: worker.stats.running == 10)
        fake.break_streams()
        await fake.async_wait_until(lambda: worker.stats.stream_errors == 1)
        release.set()  # acks are flushed during the reconnect backoff, with no stream open
        await fake.async_wait_until(lambda: worker.stats.running == 0)
        assert len(fake.dispatch.streams) == 1
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 10)
    await run_worker(fake, handler, body, concurrency=10,
                     reconnect=RetryPolicy(retries=0, initial_backoff=0.4, max_backoff=0.4))
    assert sorted(fake.dispatch.acked) == sorted(ids)
    assert len(fake.dispatch.streams) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_worker_keeps_reconnecting_until_dispatch_comes_up():
    from tests.services.client.conftest import FakeTaskwheel  # the fixture's class, started late on a known port
    port = free_port()
    late = FakeTaskwheel()
    late.port = port

    try:
        worker = Worker(f"127.0.0.1:{port}", "q", noop, reconnect=FAST_RECONNECT)
        await worker.start()
        try:
            await late.async_wait_until(lambda: worker.stats.stream_errors >= 2)
            await asyncio.to_thread(late.start, port)
            await asyncio.to_thread(late.add_deliveries, 5)
            await late.async_wait_until(lambda: len(late.dispatch.acked) == 5)
        finally:
            await worker.stop()
        stats = worker.stats
    finally:
        late.stop()
    assert stats.stream_errors >= 2 and stats.acked == 5


async def test_stop_finishes_received_deliveries_and_acks_them(fake):
    ids = fake.add_deliveries(6)
    finished = []

    async def handler(delivery):
        await asyncio.sleep(0.05)
        finished.append(delivery.delivery_id)

    async def body(worker):
        await fake.async_wait_until(lambda: worker.stats.running == 6)
        return worker
    worker = await run_worker(fake, handler, body, concurrency=6, ack_interval=60)
    assert sorted(finished) == sorted(ids)
    assert sorted(fake.dispatch.acked) == sorted(ids)
    assert worker.stats.running == 0
    (stream,) = fake.dispatch.streams
    fake.wait_until(lambda: stream.ended)
    assert stream.half_closed and not stream.broken


WORKER_PROCESS = """
import sys
import threading
from taskwheel.client import Worker

lock = threading.Lock()

def handler(delivery):  # runs on pool threads: one locked write per line
    with lock:
        sys.stdout.write(delivery.delivery_id + "\\n")
        sys.stdout.flush()

Worker(sys.argv[1], "q", handler).run()
print("stopped", flush=True)
"""


def test_run_blocks_until_sigterm_then_stops_cleanly(fake):
    fake.add_deliveries(3)
    process = subprocess.Popen([sys.executable, "-c", WORKER_PROCESS, fake.target],
                               stdout=subprocess.PIPE, text=True)
    try:
        fake.wait_until(lambda: len(fake.dispatch.acked) == 3, timeout=20)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    lines = out.split()
    assert sorted(lines[:3]) == ["d0", "d1", "d2"] and lines[3:] == ["stopped"]
    fake.wait_until(lambda: fake.dispatch.streams[0].ended)
    assert fake.dispatch.streams[0].half_closed


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("worker-test", span_exporter=exporter)
    yield exporter
    telemetry.shutdown_tracing()


async def test_traced_worker_parents_a_span_per_delivery_to_its_traceparent(fake, spans):
    with telemetry.tracer.start_as_current_span("submit") as submit:
        traceparent = telemetry.current_traceparent()
    fake.add_deliveries(2, traceparent=traceparent)
    inside = []

    async def handler(delivery):
        inside.append(telemetry.current_traceparent())

    async def body(worker):
        await fake.async_wait_until(lambda: len(fake.dispatch.acked) == 2)
    await run_worker(fake, handler, body)
    processed = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert len(processed) == 2
    assert all(s.parent.span_id == submit.context.span_id for s in processed)
    assert all(s.context.trace_id == submit.context.trace_id for s in processed)
    assert all(s.attributes["messaging.destination.name"] == "q" for s in processed)
    assert sorted(inside) == sorted(
        f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}-{s.context.trace_flags:02x}"
        for s in processed)
