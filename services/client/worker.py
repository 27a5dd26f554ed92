"""Worker: consumes one queue through Dispatch.Consume and runs a handler per delivery.

One stream per worker. The worker subscribes with ``max_in_flight`` (default twice the
concurrency, so a handler slot that frees up finds the next delivery already here), runs at most
``concurrency`` handlers at once, acks a delivery whose handler returned and nacks one whose
handler raised (the error is ``repr(exception)``; raise ``RetryAfter`` to choose the delay,
``FailNow`` to end the task without further attempts).

Acks and nacks are batched: they go out every ``ack_interval`` seconds or as soon as
``ack_batch`` are waiting, whichever comes first. A broken stream is reopened with jittered
exponential backoff; acks not yet sent, and those of deliveries still running, go out on the new
stream (a server that no longer knows a delivery id ignores it, and the task comes back when its
lease expires: delivery is at-least-once either way).

``await worker.stop()`` stops taking deliveries, finishes every delivery received before it was
called, sends their acks, half-closes the stream and waits for the server to end it. Deliveries
that arrive after stop() began are not run; the server gets them back when the stream ends or
their lease expires.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, Union

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from opentelemetry.trace import SpanKind

from taskwheel import telemetry
from taskwheel.client.client import RetryPolicy
from taskwheel.client.models import Delivery
from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc

__all__ = ["Worker", "WorkerStats", "RetryAfter", "FailNow", "Handler"]

log = logging.getLogger("taskwheel.worker")

Handler = Callable[[Delivery], Union[None, Awaitable[None]]]
MAX_IN_FLIGHT_LIMIT = 10_000
MAX_ERROR_CHARS = 2000
_NackKey = tuple[str, int, bool]  # (error, retry_after_ms, no_retry)


class RetryAfter(Exception):
    """Raise from a handler to nack with this retry delay (seconds) instead of the backoff."""

    def __init__(self, delay: float, message: str = ""):
        super().__init__(message or f"retry after {delay}s")
        self.delay = delay


class FailNow(Exception):
    """Raise from a handler to end the task FAILED now, whatever attempts are left."""


@dataclass
class WorkerStats:
    received: int = 0
    acked: int = 0
    nacked: int = 0
    running: int = 0
    connects: int = 0
    stream_errors: int = 0


class Worker:
    """Runs ``handler`` (sync or async, taking a Delivery) for each task of ``queue``."""

    def __init__(self, target: str, queue: str, handler: Handler, *, concurrency: int = 16,
                 max_in_flight: int | None = None, ack_batch: int = 256,
                 ack_interval: float = 0.005,
                 reconnect: RetryPolicy = RetryPolicy(retries=0, initial_backoff=0.05,
                                                      max_backoff=5.0),
                 options: Sequence[tuple[str, Any]] = ()):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_in_flight is None:
            max_in_flight = min(MAX_IN_FLIGHT_LIMIT, 2 * concurrency)
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise ValueError(f"max_in_flight must be 1..{MAX_IN_FLIGHT_LIMIT}")
        self.target = target
        self.queue = queue
        self.handler = handler
        self.concurrency = concurrency
        self.max_in_flight = max_in_flight
        self.ack_batch = ack_batch
        self.ack_interval = ack_interval
        self.reconnect = reconnect
        self.stats = WorkerStats()
        self._options = tuple(options)
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None))
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._channel: grpc.aio.Channel | None = None
        self._ready: asyncio.Queue[Delivery] | None = None
        self._outbox: asyncio.Queue[dispatch_pb2.ConsumeRequest | None] | None = None
        self._call: Any = None
        self._slots: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[None] | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self._acks: list[str] = []
        self._nacks: dict[_NackKey, list[str]] = {}
        self._pending = 0
        self._flush_timer: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts consuming in the background; returns at once."""
        if self._run_task is not None:
            raise RuntimeError("worker already started")
        self._ready = asyncio.Queue()
        self._outbox = asyncio.Queue()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        if not self._is_async:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix=f"taskwheel-{self.queue}")
        self._channel = grpc.aio.insecure_channel(
            self.target, options=self._options,
            interceptors=telemetry.client_interceptors() or None)
        self._slots = [asyncio.create_task(self._slot()) for _ in range(self.concurrency)]
        self._run_task = asyncio.create_task(self._run())

    async def serve(self) -> None:
        """Starts (if needed) and returns once the worker has stopped."""
        if self._run_task is None:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    def run(self) -> None:
        """Blocks consuming until SIGINT or SIGTERM, then stops cleanly."""
        asyncio.run(self._run_until_signal())

    async def _run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        await self.serve()

    async def __aenter__(self) -> "Worker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, timeout: float | None = None, grace: float = 2.0) -> None:
        """Finishes the deliveries received so far, sends their acks and closes the stream.

        ``timeout`` bounds the wait for running handlers (those still running are abandoned
        unacked); ``grace`` bounds the wait for the server to end the stream after that.
        """
        if self._run_task is None or self._stopping:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        assert self._ready is not None and self._stop_requested is not None
        self._stopping = True
        self._stop_requested.set()
        try:
            await asyncio.wait_for(self._ready.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("worker %s: stop timed out with %d deliveries running", self.queue,
                        self.stats.running)
        for slot in self._slots:
            slot.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        self._flush()
        self._send(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._run_task), grace)
        except asyncio.TimeoutError:
            if self._call is not None:
                self._call.cancel()
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        assert self._stopped is not None
        self._stopped.set()

    # -- the stream ------------------------------------------------------------------------

    async def _run(self) -> None:
        # A loop rather than tenacity: a stream that ends cleanly is reopened too, the backoff
        # starts over once a session received deliveries, and stop() cuts a wait short.
        assert self._stop_requested is not None
        failures = 0
        while not self._stopping:
            received_before = self.stats.received
            try:
                await self._session()
            except grpc.aio.AioRpcError as error:
                self.stats.stream_errors += 1
                log.warning("worker %s: stream to %s broke: %s %s", self.queue, self.target,
                            error.code().name, error.details())
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.stream_errors += 1
                log.exception("worker %s: stream failed", self.queue)
            if self._stopping:
                break
            failures = 0 if self.stats.received > received_before else failures + 1
            delay = self.reconnect.delay(failures)
            try:
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _session(self) -> None:
        assert self._channel is not None and self._ready is not None
        outbox: asyncio.Queue[dispatch_pb2.ConsumeRequest | None] = asyncio.Queue()
        outbox.put_nowait(dispatch_pb2.ConsumeRequest(subscribe=dispatch_pb2.Subscribe(
            queue=self.queue, max_in_flight=self.max_in_flight)))
        previous, self._outbox = self._outbox, outbox
        while previous is not None and not previous.empty():
            carried = previous.get_nowait()
            if carried is not None and not carried.HasField("subscribe"):
                outbox.put_nowait(carried)

        async def requests() -> Any:
            while True:
                request = await outbox.get()
                if request is None:
                    return
                yield request

        stub = dispatch_pb2_grpc.DispatchStub(self._channel)
        self._call = call = stub.Consume(requests())
        self.stats.connects += 1
        try:
            async for response in call:
                if self._stopping:
                    continue
                for message in response.deliveries:
                    self.stats.received += 1
                    self._ready.put_nowait(Delivery(message))
        finally:
            self._call = None
            if self._outbox is outbox:
                # gRPC may still be iterating requests() after the call ended; whatever it takes
                # now is written nowhere. Park the unsent requests for the next session and let
                # that iterator finish.
                parked: asyncio.Queue[dispatch_pb2.ConsumeRequest | None] = asyncio.Queue()
                while not outbox.empty():
                    parked.put_nowait(outbox.get_nowait())
                self._outbox = parked
                outbox.put_nowait(None)

    def _send(self, request: dispatch_pb2.ConsumeRequest | None) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(request)

    # -- handlers --------------------------------------------------------------------------

    async def _slot(self) -> None:
        assert self._ready is not None
        while True:
            delivery = await self._ready.get()
            self.stats.running += 1
            try:
                await self._handle(delivery)
            finally:
                self.stats.running -= 1
                self._ready.task_done()

    async def _handle(self, delivery: Delivery) -> None:
        try:
            if telemetry.enabled:
                with telemetry.tracer.start_as_current_span(
                        f"process {delivery.queue}", kind=SpanKind.CONSUMER,
                        context=telemetry.context_from_traceparent(delivery.traceparent),
                        attributes={"messaging.system": "taskwheel",
                                    "messaging.destination.name": delivery.queue,
                                    "messaging.message.id": delivery.task_id,
                                    "taskwheel.delivery_id": delivery.delivery_id,
                                    "taskwheel.attempt": delivery.attempt}):
                    await self._invoke(delivery)
            else:
                await self._invoke(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._nack(delivery.delivery_id, exc)
        else:
            self._ack(delivery.delivery_id)

    async def _invoke(self, delivery: Delivery) -> None:
        if self._is_async:
            await self.handler(delivery)  # type: ignore[misc]
            return
        call: Callable[..., Any] = self.handler
        args: tuple[Any, ...] = (delivery,)
        if telemetry.enabled:  # the handler's own spans should nest under the delivery's
            call, args = contextvars.copy_context().run, (self.handler, delivery)
        result = await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)
        if inspect.isawaitable(result):
            await result

    # -- acks ------------------------------------------------------------------------------

    def _ack(self, delivery_id: str) -> None:
        self.stats.acked += 1
        self._acks.append(delivery_id)
        self._pending_one()

    def _nack(self, delivery_id: str, exc: Exception) -> None:
        self.stats.nacked += 1
        retry_ms = round(exc.delay * 1000) if isinstance(exc, RetryAfter) else 0
        key = (repr(exc)[:MAX_ERROR_CHARS], max(0, retry_ms), isinstance(exc, FailNow))
        self._nacks.setdefault(key, []).append(delivery_id)
        self._pending_one()

    def _pending_one(self) -> None:
        self._pending += 1
        if self._pending >= self.ack_batch:
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                self.ack_interval, self._flush)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._acks:
            self._send(dispatch_pb2.ConsumeRequest(ack=dispatch_pb2.Ack(delivery_ids=self._acks)))
            self._acks = []
        for (error, retry_ms, no_retry), ids in self._nacks.items():
            nack = dispatch_pb2.Nack(delivery_ids=ids, error=error, no_retry=no_retry)
            if retry_ms:
                nack.retry_after.CopyFrom(_duration_ms(retry_ms))
            self._send(dispatch_pb2.ConsumeRequest(nack=nack))
        self._nacks = {}
        self._pending = 0


def _duration_ms(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d
