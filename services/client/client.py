"""Client and AsyncClient: submit, cancel and read tasks through the Ingest service.

Retries. Submit retries RESOURCE_EXHAUSTED and UNAVAILABLE, with jittered exponential backoff
and at least the server's ``retry-after-ms`` hint, ``RetryPolicy.retries`` times. An
UNAVAILABLE answer can come after the server made a batch durable (the connection broke on the
way back), so a retried submit without idempotency keys can create the tasks twice; give every
task an ``idempotency_key`` when duplicates matter. Get and Stats retry UNAVAILABLE; Cancel never
retries (a cancel that landed would come back FAILED_PRECONDITION).

Batches. ``submit_many`` sends at most ``max_batch`` (default 1000, the server's default limit)
tasks per RPC; AsyncClient keeps up to ``concurrency`` of those RPCs in flight.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar, Union

import grpc
import grpc.aio
from opentelemetry.trace import SpanKind

from taskwheel import telemetry
from taskwheel.client.errors import (SubmitError, TaskwheelError, error_for, from_rpc_error)
from taskwheel.client.models import (FireAt, Seconds, Stats, SubmitResult, Task, TaskSpec,
                                     spec_message)
from taskwheel.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2

__all__ = ["Client", "AsyncClient", "RetryPolicy", "SpecLike"]

SpecLike = Union[TaskSpec, task_pb2.TaskSpec, Mapping[str, Any]]
T = TypeVar("T")

DEFAULT_MAX_BATCH = 1000
_SUBMIT_RETRY = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
_READ_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE})
_NO_RETRY: frozenset[grpc.StatusCode] = frozenset()
# Big batches of 64 KiB payloads exceed gRPC's 4 MiB default.
_CHANNEL_OPTIONS = (("grpc.max_send_message_length", 128 << 20),
                    ("grpc.max_receive_message_length", 128 << 20))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried. ``RetryPolicy(retries=0)``: never."""

    retries: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based); at least ``retry_after``."""
        ceiling = min(self.max_backoff, self.initial_backoff * (2 ** min(retry, 62)))
        return max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)


def _messages(specs: Iterable[SpecLike]) -> list[task_pb2.TaskSpec]:
    out = []
    for spec in specs:
        if isinstance(spec, task_pb2.TaskSpec):
            out.append(spec)
        elif isinstance(spec, TaskSpec):
            out.append(spec.to_message())
        elif isinstance(spec, Mapping):
            out.append(spec_message(**spec))
        else:
            raise TypeError(f"submit_many: expected TaskSpec or a mapping, got "
                            f"{type(spec).__name__}")
    return out


def _chunks(messages: list[task_pb2.TaskSpec], size: int) -> list[tuple[int, list[Any]]]:
    return [(start, messages[start:start + size]) for start in range(0, len(messages), size)]


def _results(start: int, response: ingest_pb2.SubmitResponse) -> list[SubmitResult]:
    return [SubmitResult.from_message(start + i, r) for i, r in enumerate(response.results)]


def _single_task_id(results: list[SubmitResult]) -> str:
    (result,) = results
    if not result.ok:
        raise error_for(result.code, result.error)
    return result.task_id


def _check(results: list[SubmitResult], raise_on_error: bool) -> list[SubmitResult]:
    if raise_on_error and any(not r.ok for r in results):
        raise SubmitError(results)
    return results


def _attach_partial(error: TaskwheelError, results: list[SubmitResult]) -> TaskwheelError:
    # Callers who resubmit after a failed chunk need to know which chunks were answered.
    error.partial = sorted(results, key=lambda r: r.index)  # type: ignore[attr-defined]
    return error


class Client:
    """A blocking client of the Ingest service at ``target`` (host:port)."""

    def __init__(self, target: str, *, retry: RetryPolicy = RetryPolicy(),
                 timeout: float | None = 30.0, max_batch: int = DEFAULT_MAX_BATCH,
                 options: Sequence[tuple[str, Any]] = ()):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.target = target
        self.retry = retry
        self.timeout = timeout
        self.max_batch = max_batch
        self._channel = grpc.insecure_channel(target, options=(*_CHANNEL_OPTIONS, *options))
        self._ingest = ingest_pb2_grpc.IngestStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def submit(self, queue: str, payload: bytes | str = b"", *, fire_at: FireAt | None = None,
               delay: Seconds | None = None, idempotency_key: str = "", max_attempts: int = 0,
               headers: Mapping[str, str] | None = None, lease: Seconds | None = None) -> str:
        """Schedules one task and returns its id; raises InvalidTask if the server refuses it."""
        spec = spec_message(queue, payload, fire_at=fire_at, delay=delay,
                            idempotency_key=idempotency_key, max_attempts=max_attempts,
                            headers=headers, lease=lease)
        return _single_task_id(self._submit_chunk(0, [spec]))

    def submit_many(self, specs: Iterable[SpecLike], *,
                    raise_on_error: bool = False) -> list[SubmitResult]:
        """Schedules many tasks, ``max_batch`` per RPC; one result per spec, in order.

        A refused task is a result with ``ok`` false; with ``raise_on_error`` they raise
        SubmitError after every batch was sent. An RPC that fails after its retries raises, and
        the exception's ``partial`` holds the results of the batches sent before it.
        """
        messages = _messages(specs)
        results: list[SubmitResult] = []
        for start, chunk in _chunks(messages, self.max_batch):
            try:
                results.extend(self._submit_chunk(start, chunk))
            except TaskwheelError as error:
                raise _attach_partial(error, results)
        return _check(results, raise_on_error)

    def cancel(self, task_id: str) -> Task:
        """Cancels a scheduled task; TaskNotFound, or TaskEnded when it already ended."""
        response = self._call("Cancel", self._ingest.Cancel,
                              ingest_pb2.CancelRequest(task_id=task_id), _NO_RETRY)
        return Task.from_message(response.task)

    def get(self, task_id: str) -> Task:
        """The task with its state; TaskNotFound when there is none."""
        return Task.from_message(self._call("Get", self._ingest.Get,
                                            ingest_pb2.GetRequest(task_id=task_id), _READ_RETRY))

    def stats(self) -> Stats:
        return Stats.from_message(self._call("Stats", self._ingest.Stats,
                                             ingest_pb2.StatsRequest(), _READ_RETRY))

    def _submit_chunk(self, start: int, chunk: list[task_pb2.TaskSpec]) -> list[SubmitResult]:
        response = self._call("Submit", self._ingest.Submit,
                              ingest_pb2.SubmitRequest(tasks=chunk), _SUBMIT_RETRY)
        return _results(start, response)

    def _call(self, method: str, rpc: Callable[..., T], request: Any,
              retry_codes: frozenset[grpc.StatusCode]) -> T:
        if not telemetry.enabled:
            return self._call_with_retries(rpc, request, retry_codes)
        with telemetry.tracer.start_as_current_span(
                f"taskwheel.v1.Ingest/{method}", kind=SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": "taskwheel.v1.Ingest",
                            "rpc.method": method}):
            return self._call_with_retries(rpc, request, retry_codes)

    def _call_with_retries(self, rpc: Callable[..., T], request: Any,
                           retry_codes: frozenset[grpc.StatusCode]) -> T:
        # A loop rather than tenacity, which would add a measurable share to the client's CPU
        # per call; gRPC's own retry policy does not read the server's retry-after-ms.
        retry = 0
        while True:
            try:
                return rpc(request, timeout=self.timeout, metadata=telemetry.inject_metadata())
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if error.code not in retry_codes or retry >= self.retry.retries:
                    raise error from rpc_error
            time.sleep(self.retry.delay(retry, error.retry_after))
            retry += 1


class AsyncClient:
    """The asyncio client (grpc.aio). Its channel opens on first use, in the running loop."""

    def __init__(self, target: str, *, retry: RetryPolicy = RetryPolicy(),
                 timeout: float | None = 30.0, max_batch: int = DEFAULT_MAX_BATCH,
                 concurrency: int = 4, options: Sequence[tuple[str, Any]] = ()):
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be at least 1")
        self.target = target
        self.retry = retry
        self.timeout = timeout
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._options = (*_CHANNEL_OPTIONS, *options)
        self._channel: grpc.aio.Channel | None = None
        self._ingest: ingest_pb2_grpc.IngestStub | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._ingest = self._channel, None, None
            await channel.close()

    def _stub(self) -> ingest_pb2_grpc.IngestStub:
        if self._ingest is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=self._options,
                interceptors=telemetry.client_interceptors() or None)
            self._ingest = ingest_pb2_grpc.IngestStub(self._channel)
        return self._ingest

    async def submit(self, queue: str, payload: bytes | str = b"", *,
                     fire_at: FireAt | None = None, delay: Seconds | None = None,
                     idempotency_key: str = "", max_attempts: int = 0,
                     headers: Mapping[str, str] | None = None,
                     lease: Seconds | None = None) -> str:
        """Schedules one task and returns its id; raises InvalidTask if the server refuses it."""
        spec = spec_message(queue, payload, fire_at=fire_at, delay=delay,
                            idempotency_key=idempotency_key, max_attempts=max_attempts,
                            headers=headers, lease=lease)
        return _single_task_id(await self._submit_chunk(0, [spec]))

    async def submit_many(self, specs: Iterable[SpecLike], *,
                          raise_on_error: bool = False) -> list[SubmitResult]:
        """As Client.submit_many, with up to ``concurrency`` batches in flight at once.

        When a batch fails after its retries, the others still finish; the first failure is
        raised with ``partial`` holding the results of every batch that was answered.
        """
        chunks = _chunks(_messages(specs), self.max_batch)
        if len(chunks) == 1:
            start, chunk = chunks[0]
            return _check(await self._submit_chunk(start, chunk), raise_on_error)
        gate = asyncio.Semaphore(self.concurrency)

        async def send(start: int, chunk: list[task_pb2.TaskSpec]) -> list[SubmitResult]:
            async with gate:
                return await self._submit_chunk(start, chunk)

        outcomes = await asyncio.gather(*(send(s, c) for s, c in chunks), return_exceptions=True)
        results = [r for outcome in outcomes if isinstance(outcome, list) for r in outcome]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if isinstance(outcome, TaskwheelError):
                    raise _attach_partial(outcome, results)
                raise outcome
        return _check(results, raise_on_error)

    async def cancel(self, task_id: str) -> Task:
        """Cancels a scheduled task; TaskNotFound, or TaskEnded when it already ended."""
        response = await self._call(self._stub().Cancel,
                                    ingest_pb2.CancelRequest(task_id=task_id), _NO_RETRY)
        return Task.from_message(response.task)

    async def get(self, task_id: str) -> Task:
        """The task with its state; TaskNotFound when there is none."""
        return Task.from_message(await self._call(
            self._stub().Get, ingest_pb2.GetRequest(task_id=task_id), _READ_RETRY))

    async def stats(self) -> Stats:
        return Stats.from_message(await self._call(self._stub().Stats,
                                                   ingest_pb2.StatsRequest(), _READ_RETRY))

    async def _submit_chunk(self, start: int,
                            chunk: list[task_pb2.TaskSpec]) -> list[SubmitResult]:
        response = await self._call(self._stub().Submit, ingest_pb2.SubmitRequest(tasks=chunk),
                                    _SUBMIT_RETRY)
        return _results(start, response)

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: Any,
                    retry_codes: frozenset[grpc.StatusCode]) -> T:
        # A loop rather than tenacity: see Client._call_with_retries.
        retry = 0
        while True:
            try:
                return await rpc(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if error.code not in retry_codes or retry >= self.retry.retries:
                    raise error from rpc_error
            await asyncio.sleep(self.retry.delay(retry, error.retry_after))
            retry += 1
