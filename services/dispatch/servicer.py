"""Dispatch's RPC surface: the public taskwheel.v1.Dispatch service (workers' Consume streams,
Status), and the internal taskwheel.internal.v1.Dispatch (the timer's Push, across processes).
What they serve is the DispatchService (service.py)."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from taskwheel.core import shard_of
from taskwheel.dispatch.service import Deliveries, DispatchService, Ended, Refused
from taskwheel.internal.v1 import dispatch_pb2 as internal_pb2
from taskwheel.internal.v1 import dispatch_pb2_grpc as internal_pb2_grpc
from taskwheel.task import untracked
from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc
from taskwheel.wire import add_service, record_of_due

log = logging.getLogger("taskwheel.dispatch")


class DispatchServicer(dispatch_pb2_grpc.DispatchServicer):
    """taskwheel.v1.Dispatch: a worker's Consume stream, and the queues' status."""

    def __init__(self, dispatch: DispatchService) -> None:
        self._config = dispatch.config
        self._dispatch = dispatch

    def add_to_server(self, server) -> None:
        """dispatch_pb2_grpc.add_DispatchServicer_to_server, but Consume's responses are the
        ConsumeResponse wire bytes dispatch encodes, which grpc sends unchanged."""
        add_service(server, dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"], self,
                    raw_responses={"Consume"})

    async def Consume(self, request_iterator, context) -> AsyncIterator[bytes]:
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "subscribe":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message must be subscribe{queue, max_in_flight}")
        sub = first.subscribe
        if not sub.queue:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subscribe.queue is required")
        limit = self._config.limits.max_in_flight
        if sub.max_in_flight > limit:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"subscribe.max_in_flight {sub.max_in_flight} is over the limit of {limit}",
            )
        dispatch = self._dispatch
        consumer = dispatch.subscribe(sub.queue, sub.max_in_flight or self._config.default_max_in_flight)
        reader = asyncio.get_running_loop().create_task(self._read_answers(consumer, request_iterator))
        events = consumer.events
        after = None  # an end or a refusal taken while merging, for the next turn
        try:
            while True:
                event = after if after is not None else await events.get()
                after = None
                if isinstance(event, Ended):
                    break
                if isinstance(event, Refused):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, event.message)
                data = event.data
                # Messages that queued while the last one was written go out as one: a write
                # costs a few turns of the loop, so under load they queue faster than they
                # leave, and two responses' bytes one after the other are one response.
                if not events.empty():
                    parts = [data]
                    while not events.empty():
                        more = events.get_nowait()
                        if not isinstance(more, Deliveries):
                            after = more
                            break
                        parts.append(more.data)
                    data = b"".join(parts)
                yield data
        finally:
            reader.cancel()
            dispatch.unsubscribe(consumer)

    async def _read_answers(self, consumer, request_iterator) -> None:
        """The worker's acks and nacks, until its side of the stream ends."""
        dispatch = self._dispatch
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                if kind == "ack":
                    dispatch.ack(consumer, req.ack.delivery_ids)
                elif kind == "nack":
                    nack = req.nack
                    # Rounded up: a retry never comes sooner than the worker asked.
                    retry_after_ms = nack.retry_after.seconds * 1000 + -(-nack.retry_after.nanos // 1_000_000)
                    dispatch.nack(consumer, nack.delivery_ids, nack.error, retry_after_ms, nack.no_retry)
                else:
                    consumer.events.put_nowait(Refused(f"unexpected {kind or 'empty'} message after subscribe"))
                    return
                dispatch.pump(consumer.queue)
        except Exception as exc:  # the stream broke; the worker's deliveries are released
            log.debug("consumer stream ended: %s", exc)
        consumer.events.put_nowait(Ended())

    async def Status(self, request, context):
        dispatch = self._dispatch
        status = dispatch_pb2.DispatchStatus(
            delivered=dispatch.delivered, acked=dispatch.acked, nacked=dispatch.nacked,
            redelivered=dispatch.redelivered,
        )
        for name, qs in sorted(dispatch.queues().items()):
            status.queues.add(
                queue=name,
                ready=len(qs.ready),
                in_flight=sum(len(c.in_flight) for c in qs.consumers),
                workers=len(qs.consumers),
            )
        return status


class DispatchInternalServicer(internal_pb2_grpc.DispatchServicer):
    """taskwheel.internal.v1.Dispatch: the timer of another process hands fired tasks over."""

    def __init__(self, dispatch: DispatchService, num_shards: int) -> None:
        self._dispatch = dispatch
        self._num_shards = num_shards

    def add_to_server(self, server) -> None:
        internal_pb2_grpc.add_DispatchServicer_to_server(self, server)

    async def Push(self, request, context):
        num_shards = self._num_shards
        records = untracked([record_of_due(m, lambda task_id: shard_of(task_id, num_shards)) for m in request.tasks])
        await self._dispatch.push(records, request.fired_at_ms)
        return internal_pb2.PushResponse(accepted=len(records))
