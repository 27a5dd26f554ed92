"""The Ingest gRPC service: Submit, Cancel, Get, Stats."""
from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from taskwheel import telemetry
from taskwheel.config import Config
from taskwheel.core import untrack_list
from taskwheel.group_commit import Backpressure, GroupCommit
from taskwheel.clock import SYSTEM_CLOCK, Clock
from taskwheel.ingest.submits import encode_submit_results, records_of_submit
from taskwheel.ingest.validate import TaskIds, records_of_specs
from taskwheel.links import TimerLink
from taskwheel.stores.base import AlreadyEnded, Store, StoreUnavailable
from taskwheel.task import TASK_RECORD_SLOTS, TaskRecord, TaskState, accepted
from taskwheel.v1 import ingest_pb2, ingest_pb2_grpc
from taskwheel.wire import add_service, set_ms, task_message

log = logging.getLogger("taskwheel.ingest")

_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    """Validates, writes in group commits, then offers what is due soon to the timer: the
    TimerRouter, which sends each task to the timer holding its shard."""

    def __init__(self, config: Config, store: Store, timer: TimerLink, clock: Clock = SYSTEM_CLOCK) -> None:
        self._config = config
        self._clock = clock
        self._limits = config.limits
        self._store = store
        self._timer = timer
        self._ids = TaskIds()
        self._writer = GroupCommit(
            self._insert, max_batch=config.write_batch, max_pending=config.max_pending_writes,
            concurrency=store.insert_concurrency,
        )
        self.accepted = 0

    def add_to_server(self, server) -> None:
        """ingest_pb2_grpc.add_IngestServicer_to_server, but Submit is served by submit_wire,
        which takes the request's wire bytes and returns the response's."""
        add_service(server, ingest_pb2.DESCRIPTOR.services_by_name["Ingest"], self,
                    behaviors={"Submit": self.submit_wire}, raw_requests={"Submit"}, raw_responses={"Submit"})

    async def start(self) -> None:
        self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()

    async def submit_wire(self, raw: bytes, context) -> bytes:
        """Submit on the wire: the request's bytes in, the response's out. Read in C
        (ingest.submits.records_of_submit) when every task is surely valid, the common case; otherwise
        through protobuf and the validator (``Submit``), which word each task's error."""
        now = self._clock.now_ms()
        traceparent = telemetry.current_traceparent() if telemetry.enabled else ""
        records = records_of_submit(raw, self._ids, self._store.num_shards, now, self._limits,
                                    TASK_RECORD_SLOTS, accepted(now, traceparent))
        if records is None:
            try:
                request = ingest_pb2.SubmitRequest.FromString(raw)
            except DecodeError as exc:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a taskwheel.v1.SubmitRequest in protobuf's wire format: {exc}")
            return (await self.Submit(request, context)).SerializeToString()
        outcomes = await self._store_records(records, context)
        fresh = [r for r, o in zip(records, outcomes) if not o.duplicate]
        response = encode_submit_results(
            [o.task_id for o in outcomes], [r.fire_at_ms for r in records], [o.duplicate for o in outcomes])
        await self._accepted(fresh)
        return response

    async def Submit(self, request, context):
        """Submit with messages: validates each task in Python and words its errors."""
        specs = request.tasks
        count = len(specs)
        if count == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tasks is empty: send 1 or more tasks")
        if count > self._limits.max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} tasks in one Submit; the limit is {self._limits.max_batch}: split the batch",
            )
        now = self._clock.now_ms()
        traceparent = telemetry.current_traceparent() if telemetry.enabled else ""
        records, positions, errors = records_of_specs(
            specs, self._ids, self._store.num_shards, now, self._limits, traceparent)
        response = ingest_pb2.SubmitResponse()
        results = response.results
        if errors:  # otherwise (the common case) results are added in order below
            for _ in range(count):
                results.add()
            for i, message in errors:
                results[i].code = _INVALID
                results[i].error = message
        if not records:
            return response
        outcomes = await self._store_records(records, context)
        fresh = []
        add = results.add
        for pos, record, outcome in zip(positions, records, outcomes):
            result = results[pos] if errors else add()
            result.task_id = outcome.task_id
            if outcome.duplicate:
                result.duplicate = True
            else:
                set_ms(result.fire_at, record.fire_at_ms)
                fresh.append(record)
        await self._accepted(fresh)
        return response

    async def _store_records(self, records: list[TaskRecord], context) -> list:
        """Writes new tasks through the group commit; their InsertOutcomes once durable."""
        span = telemetry.tracer.start_span("ingest.store_write", attributes={
            "taskwheel.tasks": len(records)}) if telemetry.enabled else None
        try:
            return await self._writer.commit(records)
        except Backpressure as exc:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"ingest is saturated: {exc}",
                trailing_metadata=(("retry-after-ms", str(exc.retry_after_ms)),),
            )
        except StoreUnavailable as exc:
            if exc.maybe_applied:
                # A due row that reached a replica fires once even without its task row.
                message = (f"store unavailable, nothing was accepted, but some of these tasks may "
                           f"have reached the store and may run: {exc}")
            else:
                message = f"store unavailable, nothing was accepted and none of these tasks will run: {exc}"
            await context.abort(grpc.StatusCode.UNAVAILABLE, message,
                                trailing_metadata=(("retry-after-ms", str(exc.retry_after_ms)),))
        finally:
            if span is not None:
                span.end()
        raise AssertionError("context.abort returns only by raising")

    async def _accepted(self, fresh: list[TaskRecord]) -> None:
        self.accepted += len(fresh)
        if fresh:
            # Durable already; the offer only saves the timer a store read for tasks due soon.
            self._timer.offer(fresh)

    async def _insert(self, records: list[TaskRecord]) -> list:
        """The group commit's store call. Its batch holds untracked records only (see
        core.untrack_list): out of the GC's view too, while the write runs."""
        untrack_list(records)
        return await self._store.insert(records)

    async def Get(self, request, context):
        task_id = await self._task_id(request, context)
        record = await self._call_store(context, self._store.get(task_id))
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task with id {task_id!r}")
        return task_message(record)

    async def Cancel(self, request, context):
        task_id = await self._task_id(request, context)
        try:
            record = await self._call_store(context, self._store.cancel(task_id, self._clock.now_ms()))
        except AlreadyEnded as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"task {task_id!r} already ended as {exc.record.state.name}; nothing to cancel",
            )
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task with id {task_id!r}")
        self._timer.forget([task_id])
        return ingest_pb2.CancelResponse(task=task_message(record))

    async def Stats(self, request, context):
        counts = await self._call_store(context, self._store.counts())
        return ingest_pb2.StatsResponse(
            scheduled=counts.get(TaskState.SCHEDULED, 0),
            leased=counts.get(TaskState.LEASED, 0),
            succeeded=counts.get(TaskState.SUCCEEDED, 0),
            failed=counts.get(TaskState.FAILED, 0),
            cancelled=counts.get(TaskState.CANCELLED, 0),
            store=self._store.description,
        )

    async def _task_id(self, request, context) -> str:
        task_id = request.task_id
        if not task_id or len(task_id) > 128:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "task_id is required (1-128 characters)")
        return task_id

    async def _call_store(self, context, coro):
        try:
            return await coro
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}",
                                trailing_metadata=(("retry-after-ms", str(exc.retry_after_ms)),))
