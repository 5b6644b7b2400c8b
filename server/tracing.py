"""OpenTelemetry traces: a SERVER span per RPC, a child span per stage of each reply.

Optional: this module imports OpenTelemetry (the `[otel]` extra) and is imported only when
`--otel` is on, so the server runs without it. The caller's trace context comes from the
call's gRPC metadata (W3C `traceparent`, through the globally configured propagator, which
the client library fills in: `client/base.py`), so the server span is a child of the
client's.

Stage spans are made after the fact from each reply's `Timing`, with explicit start and end
times, rather than by threading a context through the batchers: the encoding stages
(preprocess, queue, inference) are laid end to end from the start of the reply's own time,
and the store stage (search or store_write) ends when the reply is sent. The durations are
exact; the placement of a store call that ran before encoding (the collection check) is
not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

__all__ = ["RpcTracer", "Span", "default_provider"]

STORE_STAGES = ("search", "store_write")


def _version() -> str:
    try:
        return version("clipsearch")
    except PackageNotFoundError:
        return "unknown"


def default_provider() -> tuple[TracerProvider, bool]:
    """The tracer provider to use and whether this server owns it (and must shut it down).

    A provider the process has configured already (`opentelemetry-instrument`, or the
    application embedding the server) is used as it is; otherwise an SDK provider that sends
    spans in batches over OTLP/gRPC, configured by the standard OTEL_* environment variables
    (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...)."""
    current = trace.get_tracer_provider()
    if isinstance(current, SdkTracerProvider):
        return current, False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "clipsearch"}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider, True


class RpcTracer:
    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("clipsearch.server", _version())

    def start(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], start_ns: int
    ) -> Span:
        """The call's SERVER span, a child of the caller's span when the metadata has one."""
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        parent: Context = propagate.extract(carrier)
        full = method.lstrip("/")
        service, _, name = full.partition("/")
        return self._tracer.start_span(
            full,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    def stages(
        self,
        span: Span,
        stages: Sequence[tuple[str, int]],
        *,
        start_ns: int,
        end_ns: int,
        batch_size: int,
        model: str,
    ) -> None:
        """One child span per stage of a reply whose time ran from `start_ns` to `end_ns`."""
        context = trace.set_span_in_context(span)
        cursor = start_ns
        for stage, us in stages:
            if stage in STORE_STAGES:
                begin, end = end_ns - us * 1000, end_ns
            else:
                begin, end = cursor, cursor + us * 1000
                cursor = end
            attributes: dict[str, str | int] = {"clipsearch.stage": stage}
            if stage == "inference":
                attributes.update({"clipsearch.batch_size": batch_size, "clipsearch.model": model})
            child = self._tracer.start_span(
                stage, context=context, start_time=begin, attributes=attributes
            )
            child.end(end_time=end)

    def finish(
        self,
        span: Span,
        code: grpc.StatusCode,
        end_ns: int,
        *,
        batch_size: int,
        model: str,
        messages: int,
    ) -> None:
        span.set_attribute("rpc.grpc.status_code", int(code.value[0]))
        span.set_attribute("clipsearch.responses", messages)
        if batch_size:
            span.set_attribute("clipsearch.batch_size", batch_size)
        if model:
            span.set_attribute("clipsearch.model", model)
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end(end_time=end_ns)
