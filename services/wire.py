"""Conversions between the store's TaskRecord and the taskwheel.v1 messages, and serving a
taskwheel.v1 service whose hot methods take or return wire bytes."""
from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

import grpc
from google.protobuf import message_factory

from taskwheel.task import DUE_TASK_FIELDS, TaskRecord, TaskState
from taskwheel.internal.v1 import timer_pb2
from taskwheel.v1 import task_pb2

# (client streaming, server streaming) -> grpc's handler of that kind.
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server, service, servicer, *, behaviors: Mapping[str, Callable[..., Any]] | None = None,
                raw_requests: Collection[str] = (), raw_responses: Collection[str] = ()) -> None:
    """What a generated ``add_<Service>Servicer_to_server`` does, built from the service's
    descriptor (so a method added to the .proto is served too): each method is the
    servicer's of its name, or ``behaviors[name]``. Methods named in ``raw_requests`` get
    the request's wire bytes instead of a message; those in ``raw_responses`` may return
    (or stream) wire bytes, which grpc sends unchanged, as well as messages."""
    behaviors = behaviors or {}
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behaviors.get(method.name) or getattr(servicer, method.name),
            request_deserializer=None if method.name in raw_requests else request.FromString,
            response_serializer=_response_bytes if method.name in raw_responses else response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _response_bytes(msg) -> bytes:
    return msg if type(msg) is bytes else msg.SerializeToString()


def set_ms(ts, ms: int) -> None:
    """Fills a google.protobuf.Timestamp from unix milliseconds (floor semantics for negatives)."""
    ts.seconds, rem = divmod(ms, 1000)
    ts.nanos = rem * 1_000_000


def ms_of(ts) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def due_message(rec: TaskRecord) -> timer_pb2.DueTask:
    return timer_pb2.DueTask(**{name: getattr(rec, name) for name in DUE_TASK_FIELDS})


def record_of_due(msg: timer_pb2.DueTask, shard_of) -> TaskRecord:
    values = {name: getattr(msg, name) for name in DUE_TASK_FIELDS}
    values["headers"] = dict(msg.headers)
    return TaskRecord(shard=shard_of(msg.task_id), **values)


def task_message(rec: TaskRecord) -> task_pb2.Task:
    task = task_pb2.Task(
        task_id=rec.task_id,
        queue=rec.queue,
        payload=rec.payload,
        state=int(rec.state),
        # A LEASED task's row carries its lease row's attempt (the redelivery's); the
        # contract reports the delivery in progress.
        attempt=rec.attempt - 1 if rec.state == TaskState.LEASED and rec.attempt > 1 else rec.attempt,
        max_attempts=rec.max_attempts,
        headers=rec.headers,
        idempotency_key=rec.idempotency_key,
        last_error=rec.last_error,
    )
    set_ms(task.fire_at, rec.fire_at_ms)
    set_ms(task.due_at, rec.due_ms)
    set_ms(task.created_at, rec.created_ms)
    set_ms(task.updated_at, rec.updated_ms or rec.created_ms)
    task.lease.seconds, rem = divmod(rec.lease_ms, 1000)
    task.lease.nanos = rem * 1_000_000
    return task


def state_name(state: int) -> str:
    return TaskState(state).name.lower()
