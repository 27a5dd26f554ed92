"""A real gRPC server (Ingest + Dispatch on 127.0.0.1, in-memory state) for the client's tests.

It is a test double of the servers for the CLIENT's tests only: it records every request as it
arrived, so the tests can check how the client shapes its calls, and it fails or breaks calls on
demand. The real servers are tested end to end elsewhere.

The server runs on its own event loop in a thread, so blocking and asyncio clients talk to it
alike; tests change its state through the thread-safe methods below.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from google.protobuf import timestamp_pb2

from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc, ingest_pb2, ingest_pb2_grpc, task_pb2

TASK_STATE_SCHEDULED = 1
TASK_STATE_CANCELLED = 5
FIRE_AT_S = 1_900_000_000  # the fire time of every fake delivery (plus 5 ms)


def now_timestamp(offset_ns: int = 0) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns() + offset_ns)
    return ts


class FakeIngest(ingest_pb2_grpc.IngestServicer):
    """Keeps tasks in a dict. Refuses, per item, a task whose queue is empty or "bad"."""

    def __init__(self):
        self.submits: list[ingest_pb2.SubmitRequest] = []
        self.calls: list[str] = []
        self.failures: deque[tuple[grpc.StatusCode, str, int | None]] = deque()
        self.failing_submits: dict[int, grpc.StatusCode] = {}
        self.tasks: dict[str, task_pb2.Task] = {}
        self.by_key: dict[tuple[str, str], str] = {}
        self.ids = itertools.count(1)

    async def _maybe_fail(self, context):
        if self.failures:
            code, details, retry_after_ms = self.failures.popleft()
            if retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(retry_after_ms)),))
            await context.abort(code, details)

    async def Submit(self, request, context):
        self.calls.append("Submit")
        self.submits.append(request)
        await self._maybe_fail(context)
        if len(self.submits) in self.failing_submits:
            await context.abort(self.failing_submits[len(self.submits)], "injected")
        if not 1 <= len(request.tasks) <= 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tasks: 1..1000 per request")
        results = []
        for spec in request.tasks:
            if spec.queue in ("", "bad"):
                results.append(ingest_pb2.SubmitResult(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], error="queue: not allowed"))
                continue
            key = (spec.queue, spec.idempotency_key)
            if spec.idempotency_key and key in self.by_key:
                first = self.tasks[self.by_key[key]]
                results.append(ingest_pb2.SubmitResult(task_id=first.task_id, duplicate=True,
                                                       fire_at=first.fire_at))
                continue
            task_id = f"t{next(self.ids)}"
            if spec.HasField("fire_at"):
                fire_at = spec.fire_at
            else:
                fire_at = now_timestamp(spec.delay.ToNanoseconds())
            self.tasks[task_id] = task_pb2.Task(
                task_id=task_id, queue=spec.queue, payload=spec.payload, fire_at=fire_at,
                due_at=fire_at, state=TASK_STATE_SCHEDULED, attempt=1,
                max_attempts=spec.max_attempts or 3, headers=spec.headers,
                idempotency_key=spec.idempotency_key, created_at=now_timestamp(),
                updated_at=now_timestamp(), lease=spec.lease)
            if spec.idempotency_key:
                self.by_key[key] = task_id
            results.append(ingest_pb2.SubmitResult(task_id=task_id, fire_at=fire_at))
        return ingest_pb2.SubmitResponse(results=results)

    async def Get(self, request, context):
        self.calls.append("Get")
        await self._maybe_fail(context)
        if request.task_id not in self.tasks:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task_id: no task {request.task_id}")
        return self.tasks[request.task_id]

    async def Cancel(self, request, context):
        self.calls.append("Cancel")
        await self._maybe_fail(context)
        task = self.tasks.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task_id: no task {request.task_id}")
        if task.state != TASK_STATE_SCHEDULED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "task_id: already ended")
        task.state = TASK_STATE_CANCELLED
        return ingest_pb2.CancelResponse(task=task)

    async def Stats(self, request, context):
        self.calls.append("Stats")
        await self._maybe_fail(context)
        scheduled = sum(1 for t in self.tasks.values() if t.state == TASK_STATE_SCHEDULED)
        cancelled = sum(1 for t in self.tasks.values() if t.state == TASK_STATE_CANCELLED)
        return ingest_pb2.StatsResponse(scheduled=scheduled, cancelled=cancelled, store="fake")


@dataclass
class ConsumeStream:
    subscribe: dispatch_pb2.Subscribe
    unacked: set[str] = field(default_factory=set)
    max_unacked: int = 0
    half_closed: bool = False
    broken: bool = False
    ended: bool = False


class FakeDispatch(dispatch_pb2_grpc.DispatchServicer):
    """Hands out queued deliveries, never more unacked per stream than max_in_flight.

    Acks and nacks are recorded message by message; an ack for a delivery handed out on an
    earlier stream counts too. ``break_streams`` aborts every open stream with UNAVAILABLE.
    """

    def __init__(self):
        self.ready: deque[task_pb2.Delivery] = deque()
        self.streams: list[ConsumeStream] = []
        self.ack_messages: list[list[str]] = []
        self.nack_messages: list[dispatch_pb2.Nack] = []
        self.acked: list[str] = []
        self.nacked: list[str] = []
        self.delivered: list[str] = []
        self.changed: asyncio.Condition | None = None

    async def _notify(self):
        async with self.changed:
            self.changed.notify_all()

    def _settle(self, delivery_ids):
        for stream in self.streams:
            stream.unacked.difference_update(delivery_ids)

    async def Consume(self, request_iterator, context):
        first = await request_iterator.__anext__()
        assert first.HasField("subscribe"), "the first message must be subscribe"
        stream = ConsumeStream(first.subscribe)
        self.streams.append(stream)

        async def read():
            async for request in request_iterator:
                if request.HasField("ack"):
                    ids = list(request.ack.delivery_ids)
                    self.ack_messages.append(ids)
                    self.acked.extend(ids)
                    self._settle(ids)
                elif request.HasField("nack"):
                    self.nack_messages.append(request.nack)
                    self.nacked.extend(request.nack.delivery_ids)
                    self._settle(request.nack.delivery_ids)
                await self._notify()
            stream.half_closed = True
            await self._notify()

        reader = asyncio.create_task(read())
        limit = stream.subscribe.max_in_flight
        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(lambda: stream.half_closed or stream.broken or (
                        self.ready and len(stream.unacked) < limit))
                if stream.broken:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dispatch restarting")
                if stream.half_closed:
                    return
                batch = []
                while self.ready and len(stream.unacked) < limit:
                    delivery = self.ready.popleft()
                    batch.append(delivery)
                    stream.unacked.add(delivery.delivery_id)
                    self.delivered.append(delivery.delivery_id)
                stream.max_unacked = max(stream.max_unacked, len(stream.unacked))
                await context.write(dispatch_pb2.ConsumeResponse(deliveries=batch))
        finally:
            stream.ended = True
            reader.cancel()


def wait_until(predicate, timeout=5.0, interval=0.005):
    """Polls ``predicate`` until true; fails the test with a message when it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def async_wait_until(predicate, timeout=5.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


class FakeTaskwheel:
    """Both fakes on one port, served from a background thread's event loop."""

    wait_until = staticmethod(wait_until)
    async_wait_until = staticmethod(async_wait_until)

    def __init__(self):
        self.ingest = FakeIngest()
        self.dispatch = FakeDispatch()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, port: int = 0) -> "FakeTaskwheel":
        self.thread.start()

        async def start():
            self.dispatch.changed = asyncio.Condition()
            self.server = grpc.aio.server()
            ingest_pb2_grpc.add_IngestServicer_to_server(self.ingest, self.server)
            dispatch_pb2_grpc.add_DispatchServicer_to_server(self.dispatch, self.server)
            bound = self.server.add_insecure_port(f"127.0.0.1:{port}")
            await self.server.start()
            return bound
        self.port = self._run(start())
        return self

    def stop(self):
        if self.server is not None:
            self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def fail_next(self, code: grpc.StatusCode, details: str = "injected",
                  retry_after_ms: int | None = None, times: int = 1):
        """The next ``times`` Ingest calls fail with ``code`` (and a retry-after-ms trailer)."""
        for _ in range(times):
            self.ingest.failures.append((code, details, retry_after_ms))

    def fail_submit_number(self, number: int, code: grpc.StatusCode):
        """The ``number``-th Submit (1-based, retries included) fails with ``code``."""
        self.ingest.failing_submits[number] = code

    def add_deliveries(self, count: int, queue: str = "q", prefix: str = "d",
                       traceparent: str = "") -> list[str]:
        ids = [f"{prefix}{i}" for i in range(count)]

        async def add():
            for i, delivery_id in enumerate(ids):
                self.dispatch.ready.append(task_pb2.Delivery(
                    task_id=f"task-{delivery_id}", delivery_id=delivery_id, queue=queue,
                    payload=str(i).encode(), attempt=1, max_attempts=3,
                    fire_at=timestamp_pb2.Timestamp(seconds=FIRE_AT_S, nanos=5_000_000),
                    traceparent=traceparent))
            await self.dispatch._notify()
        self._run(add())
        return ids

    def break_streams(self):
        async def brk():
            for stream in self.dispatch.streams:
                stream.broken = True
            await self.dispatch._notify()
        self._run(brk())


@pytest.fixture
def fake():
    server = FakeTaskwheel().start()
    yield server
    server.stop()
