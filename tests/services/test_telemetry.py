"""taskwheel.telemetry: OTEL_* configuration, a span per RPC, context through traceparent."""
from __future__ import annotations

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskwheel import telemetry
from taskwheel.v1 import (dispatch_pb2, dispatch_pb2_grpc, ingest_pb2, ingest_pb2_grpc,
                          task_pb2)

OTEL_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME",
             "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    telemetry.shutdown_tracing()


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    assert telemetry.setup_tracing("test-service", span_exporter=exporter)
    return exporter


class TracedIngest(ingest_pb2_grpc.IngestServicer):
    """Answers Get for "t1" only, and raises on Stats: enough to see spans and their codes."""

    def __init__(self):
        self.seen_traceparents = []

    async def Get(self, request, context):
        self.seen_traceparents.append(telemetry.current_traceparent())
        if request.task_id != "t1":
            await context.abort(grpc.StatusCode.NOT_FOUND, "task_id: no such task")
        return task_pb2.Task(task_id="t1")

    async def Stats(self, request, context):
        raise RuntimeError("boom")


class TracedDispatch(dispatch_pb2_grpc.DispatchServicer):
    async def Consume(self, request_iterator, context):
        async for request in request_iterator:
            yield dispatch_pb2.ConsumeResponse(
                deliveries=[task_pb2.Delivery(delivery_id=request.subscribe.queue)])
            return


async def run_with_server(body, interceptors, client_interceptors=None):
    server = grpc.aio.server(interceptors=interceptors)
    ingest = TracedIngest()
    ingest_pb2_grpc.add_IngestServicer_to_server(ingest, server)
    dispatch_pb2_grpc.add_DispatchServicer_to_server(TracedDispatch(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}",
                interceptors=telemetry.client_interceptors() if client_interceptors is None
                else client_interceptors) as channel:
            return await body(channel, ingest)
    finally:
        await server.stop(None)


def server_spans(exporter):
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def test_tracing_is_off_without_exporter_configuration():
    assert telemetry.setup_tracing("svc") is False
    assert telemetry.enabled is False
    assert telemetry.current_traceparent() == ""
    assert telemetry.server_interceptors() == []
    assert telemetry.client_interceptors() == []


def test_otlp_endpoint_alone_turns_on_the_otlp_exporter(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert telemetry.setup_tracing("svc") is True
    assert telemetry.enabled


def test_traces_exporter_none_wins_over_an_endpoint(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.setup_tracing("svc") is False


def test_sdk_disabled_turns_tracing_off(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert telemetry.setup_tracing("svc") is False


def test_unknown_exporter_is_rejected_naming_the_variable(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        telemetry.setup_tracing("svc")


def test_otel_service_name_overrides_the_name_passed_in(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("from-code", span_exporter=exporter)
    with telemetry.tracer.start_as_current_span("x"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "from-env"


def test_traceparent_string_parents_a_span_in_the_same_trace(spans):
    with telemetry.tracer.start_as_current_span("submit") as submit:
        traceparent = telemetry.current_traceparent()
    assert traceparent.startswith("00-")
    parent = telemetry.context_from_traceparent(traceparent)
    with telemetry.tracer.start_as_current_span("fire", context=parent) as fire:
        pass
    assert fire.context.trace_id == submit.context.trace_id
    assert fire.parent.span_id == submit.context.span_id


def test_traceparent_string_makes_a_link_to_the_stored_span(spans):
    with telemetry.tracer.start_as_current_span("submit") as submit:
        link = telemetry.link_from_traceparent(telemetry.current_traceparent())
    with telemetry.tracer.start_as_current_span("fire batch", links=[link]) as batch:
        pass
    assert batch.links[0].context.span_id == submit.context.span_id
    assert batch.context.trace_id != submit.context.trace_id


def test_empty_or_malformed_traceparent_gives_no_context(spans):
    assert telemetry.context_from_traceparent("") is None
    assert telemetry.context_from_traceparent("00-zz-not-a-traceparent") is None
    assert telemetry.link_from_traceparent("") is None


async def test_server_interceptor_records_one_span_per_rpc(spans):
    async def body(channel, _):
        stub = ingest_pb2_grpc.IngestStub(channel)
        for _ in range(3):
            await stub.Get(ingest_pb2.GetRequest(task_id="t1"))
    await run_with_server(body, telemetry.server_interceptors())
    recorded = server_spans(spans)
    assert [s.name for s in recorded] == ["taskwheel.v1.Ingest/Get"] * 3
    assert all(s.attributes["rpc.grpc.status_code"] == 0 for s in recorded)
    assert all(s.attributes["rpc.method"] == "Get" for s in recorded)


async def test_server_span_continues_the_callers_trace_from_metadata(spans):
    async def body(channel, _):
        with telemetry.tracer.start_as_current_span("caller") as caller:
            await ingest_pb2_grpc.IngestStub(channel).Get(ingest_pb2.GetRequest(task_id="t1"))
        return caller
    caller = await run_with_server(body, telemetry.server_interceptors())
    (server,) = server_spans(spans)
    (client,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert server.context.trace_id == caller.context.trace_id
    assert client.parent.span_id == caller.context.span_id
    assert server.parent.span_id == client.context.span_id


async def test_server_span_is_current_inside_the_handler(spans):
    async def body(channel, ingest):
        await ingest_pb2_grpc.IngestStub(channel).Get(ingest_pb2.GetRequest(task_id="t1"))
        return ingest.seen_traceparents
    (seen,) = await run_with_server(body, telemetry.server_interceptors())
    (server,) = server_spans(spans)
    ctx = server.context
    assert seen == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


async def test_aborted_rpc_records_its_code_without_marking_a_server_error(spans):
    async def body(channel, _):
        with pytest.raises(grpc.aio.AioRpcError):
            await ingest_pb2_grpc.IngestStub(channel).Get(ingest_pb2.GetRequest(task_id="nope"))
    await run_with_server(body, telemetry.server_interceptors())
    (server,) = server_spans(spans)
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert server.status.status_code != StatusCode.ERROR


async def test_handler_exception_marks_the_server_span_as_error(spans):
    async def body(channel, _):
        with pytest.raises(grpc.aio.AioRpcError):
            await ingest_pb2_grpc.IngestStub(channel).Stats(ingest_pb2.StatsRequest())
    await run_with_server(body, telemetry.server_interceptors())
    (server,) = server_spans(spans)
    assert server.status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in server.events)


async def test_streaming_rpc_gets_one_span_covering_the_stream(spans):
    async def body(channel, _):
        call = dispatch_pb2_grpc.DispatchStub(channel).Consume(iter([
            dispatch_pb2.ConsumeRequest(subscribe=dispatch_pb2.Subscribe(queue="q"))]))
        return [r async for r in call]
    responses = await run_with_server(body, telemetry.server_interceptors())
    assert responses[0].deliveries[0].delivery_id == "q"
    (server,) = server_spans(spans)
    assert server.name == "taskwheel.v1.Dispatch/Consume"


async def test_disabled_tracing_creates_no_spans_even_with_interceptors_installed():
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("svc", span_exporter=exporter)
    telemetry.shutdown_tracing()

    async def body(channel, ingest):
        await ingest_pb2_grpc.IngestStub(channel).Get(ingest_pb2.GetRequest(task_id="t1"))
        return ingest.seen_traceparents
    seen = await run_with_server(body, [telemetry.ServerInterceptor()],
                                 [telemetry.AioClientInterceptor()])
    assert seen == [""]
    assert exporter.get_finished_spans() == ()
    assert telemetry.inject_metadata((("k", "v"),)) == (("k", "v"),)
