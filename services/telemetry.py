"""OpenTelemetry tracing for every taskwheel process, off by default and then free.

Configuration is the standard OTEL_* environment, read once by ``setup_tracing``:

* ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none`` (a comma list is allowed). Unset
  means ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
  set, and ``none`` otherwise: a process nobody pointed at a collector traces nothing.
* ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else is set.
* ``OTEL_SERVICE_NAME`` overrides the name the process passes in; ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*`` and the ``OTEL_EXPORTER_OTLP_*`` endpoint,
  headers and timeout are read by the SDK itself. Only the gRPC flavour of OTLP is installed.

The hot path pays one module-attribute read when tracing is off::

    from taskwheel import telemetry

    if telemetry.enabled:
        with telemetry.tracer.start_as_current_span("fire", context=...):
            ...

Read ``telemetry.enabled`` and ``telemetry.tracer`` through the module (``from ... import
enabled`` would freeze the value at import time). ``server_interceptors()`` and
``client_interceptors()`` return empty lists when tracing is off, so channels and servers built
then carry no interceptor at all.

A task's trace context travels as a W3C ``traceparent`` string: ingest stores
``current_traceparent()`` with the task, the timer and dispatch carry it on ``DueTask`` and
``Delivery``, and each stage parents (or links) its span with ``context_from_traceparent``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "enabled",
    "tracer",
    "setup_tracing",
    "shutdown_tracing",
    "current_traceparent",
    "context_from_traceparent",
    "link_from_traceparent",
    "inject_metadata",
    "ServerInterceptor",
    "AioClientInterceptor",
    "server_interceptors",
    "client_interceptors",
]

INSTRUMENTATION_NAME = "taskwheel"

enabled: bool = False
tracer: Tracer = trace.NoOpTracer()

_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider while enabled
_propagator = TraceContextTextMapPropagator()

# Server-side codes that mean the server failed (semantic conventions for RPC spans); the
# others (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED...) are the caller's business.
_SERVER_ERROR_CODES = frozenset({
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})


def _exporter_names() -> list[str]:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = os.environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _make_exporter(name: str) -> Any:
    if name == "otlp":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
        if protocol != "grpc":
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only 'grpc' is installed "
                "(opentelemetry-exporter-otlp-proto-grpc)")
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")


def setup_tracing(service_name: str, *, span_exporter: Any = None) -> bool:
    """Configure tracing for this process from the OTEL_* environment; returns ``enabled``.

    ``span_exporter`` (tests, embedding) bypasses the environment: its spans are exported
    synchronously as each one ends. Calling again replaces the previous configuration.
    """
    global enabled, tracer, _provider
    if span_exporter is None:
        exporters = [_make_exporter(name) for name in _exporter_names()]
    else:
        exporters = [span_exporter]
    shutdown_tracing()
    if not exporters:
        return False

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    for exporter in exporters:
        processor = SimpleSpanProcessor if span_exporter is not None else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    _install_global(provider)
    _provider = provider
    tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    enabled = True
    return True


def _install_global(provider: Any) -> None:
    # The global provider can be set once per process; it matters only to user code (a worker's
    # handler calling trace.get_tracer), so the first configuration wins and later ones (tests)
    # keep using their own provider through ``telemetry.tracer``.
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    """Flush and stop the exporters; tracing is off afterwards."""
    global enabled, tracer, _provider
    provider, _provider = _provider, None
    enabled = False
    tracer = trace.NoOpTracer()
    if provider is not None:
        provider.shutdown()


def current_traceparent() -> str:
    """The W3C traceparent of the current span, or '' when tracing is off or no span is active."""
    if not enabled:
        return ""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def context_from_traceparent(traceparent: str) -> Context | None:
    """A context whose parent is the span named by ``traceparent``; None when it is empty or bad.

    Pass it as ``tracer.start_as_current_span(name, context=...)``; None there means "the
    current context", so a missing traceparent starts (or continues) the local trace.
    """
    if not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def link_from_traceparent(traceparent: str) -> Link | None:
    """A span link to the span named by ``traceparent`` (for batch spans with many parents)."""
    ctx = context_from_traceparent(traceparent)
    if ctx is None:
        return None
    return Link(trace.get_current_span(ctx).get_span_context())


def inject_metadata(metadata: Sequence[tuple[str, str]] | None = None
                    ) -> Sequence[tuple[str, str]] | None:
    """``metadata`` plus the current trace context (``traceparent``/``tracestate``) when tracing."""
    if not enabled:
        return metadata
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


def _context_from_metadata(metadata: Iterable[Any] | None) -> Context | None:
    if not metadata:
        return None
    carrier = {}
    for key, value in metadata:
        if key in ("traceparent", "tracestate"):
            carrier[key] = value
    if "traceparent" not in carrier:
        return None
    return _propagator.extract(carrier)


def _rpc_attributes(full_method: str) -> tuple[str, dict[str, str]]:
    # "/taskwheel.v1.Ingest/Submit" -> span "taskwheel.v1.Ingest/Submit"
    name = full_method.lstrip("/")
    service, _, method = name.partition("/")
    return name, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def _finish_server_span(span: Any, servicer_context: Any, error: BaseException | None) -> None:
    code = None
    try:
        code = servicer_context.code()
    except Exception:  # older grpc, or a context without the accessor
        pass
    if isinstance(code, int) and not isinstance(code, grpc.StatusCode):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    if code is None:
        code = grpc.StatusCode.UNKNOWN if _is_failure(error) else grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}"))
    if _is_failure(error):
        span.record_exception(error)  # type: ignore[arg-type]


def _is_failure(error: BaseException | None) -> bool:
    # grpc.aio's abort() unwinds with AbortError after setting the code: not a server fault.
    return error is not None and not isinstance(error, grpc.aio.AbortError)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per RPC, child of the caller's context from the request metadata.

    Streaming responses keep the span open until the stream ends; the span is current only while
    the handler itself runs, never across the points where it hands a message to gRPC.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not enabled or handler is None:
            return handler
        name, attributes = _rpc_attributes(handler_call_details.method)
        parent = _context_from_metadata(handler_call_details.invocation_metadata)

        def start_span() -> Any:
            return tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                     attributes=attributes)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(handler.unary_unary, start_span),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(handler.stream_unary, start_span),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(handler.unary_stream, start_span),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, start_span),
            handler.request_deserializer, handler.response_serializer)


def _wrap_unary_response(behavior: Callable[..., Any], start_span: Callable[[], Any]
                         ) -> Callable[..., Any]:
    async def traced(request: Any, servicer_context: Any) -> Any:
        span = start_span()
        error: BaseException | None = None
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            result = behavior(request, servicer_context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            _finish_server_span(span, servicer_context, error)
            span.end()
    return traced


def _wrap_stream_response(behavior: Callable[..., Any], start_span: Callable[[], Any]
                          ) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def traced_gen(request: Any, servicer_context: Any) -> AsyncIterator[Any]:
            span = start_span()
            span_ctx = trace.set_span_in_context(span)
            error: BaseException | None = None
            responses = behavior(request, servicer_context)
            try:
                while True:
                    token = otel_context.attach(span_ctx)
                    try:
                        response = await responses.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(token)
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                await responses.aclose()
                _finish_server_span(span, servicer_context, error)
                span.end()
        return traced_gen
    # A coroutine handler that writes with servicer_context.write() behaves like a unary one.
    return _wrap_unary_response(behavior, start_span)


class AioClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Carries the current trace context to the server in the call's metadata.

    Unary calls also get a CLIENT span covering the whole call; streams (a worker's Consume lives
    for hours) only propagate the context of whatever span is current when they open.
    """

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        if not enabled:
            return await continuation(client_call_details, request)
        name, attributes = _rpc_attributes(_method_str(client_call_details.method))
        with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes,
                                          record_exception=False) as span:
            call = await continuation(_with_trace_metadata(client_call_details), request)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                span.set_status(Status(StatusCode.ERROR, exc.code().name))
            else:
                span.set_attribute("rpc.grpc.status_code", 0)
            return call

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_trace_metadata(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_trace_metadata(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(_with_trace_metadata(client_call_details), request_iterator)


def _method_str(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _with_trace_metadata(details: Any) -> Any:
    if not enabled:
        return details
    metadata = inject_metadata(tuple(details.metadata or ()))
    return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                      grpc.aio.Metadata(*metadata) if metadata else None,
                                      details.credentials, details.wait_for_ready)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for ``grpc.aio.server(interceptors=...)``: none when tracing is off."""
    return [ServerInterceptor()] if enabled else []


def client_interceptors() -> list[Any]:
    """Interceptors for ``grpc.aio.insecure_channel(interceptors=...)``; none when off."""
    return [AioClientInterceptor()] if enabled else []
