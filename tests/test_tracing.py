"""OpenTelemetry traces: a SERVER span per call, a child per stage, joined to the caller's
trace through the gRPC metadata the client library fills in. Spans are caught by the SDK's
in-memory exporter; the server runs on port 0 with the demo model and Milvus Lite."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from image_fixtures import encode, pattern
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from server_fixtures import ThreadedServer, quick_settings, served_model

from clipsearch.client import AsyncClient, Client, IngestItem, NotFound
from clipsearch.client.base import trace_context
from clipsearch.server.app import default_components

SEARCH = "clipsearch.v1.ClipSearch/Search"
INGEST = "clipsearch.v1.ClipSearch/Ingest"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, provider: TracerProvider
) -> Iterator[ThreadedServer]:
    db = tmp_path_factory.mktemp("tracing") / "t.db"
    components = replace(default_components(), tracer_provider=provider)
    with ThreadedServer(quick_settings(db, served_model(), otel=True), components) as running:
        with Client(running.address) as client:
            client.create_collection("traced", exist_ok=True)
        yield running


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """The finished spans called `name`, once there is one: a call that fails has sent its
    status to the client (`context.abort`) a moment before its handler, and span, end."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [span for span in exporter.get_finished_spans() if span.name == name]
        if found:
            return found
        time.sleep(0.005)
    return []


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        span
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


def test_the_server_span_continues_the_clients_trace(
    server: ThreadedServer, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test-client")
    with Client(server.address) as client:
        with tracer.start_as_current_span("find-dogs") as caller:
            result = client.search("a photo of a dog", collection="traced")
        info = client.info()
    (span,) = named(spans, SEARCH)
    context = caller.get_span_context()
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.span_id == context.span_id
    assert span.context is not None and span.context.trace_id == context.trace_id
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "clipsearch.v1.ClipSearch"
    assert attributes["rpc.method"] == "Search"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["clipsearch.model"] == info.model_name
    assert attributes["clipsearch.batch_size"] == result.timing.batch_size == 1
    assert span.status.status_code is StatusCode.UNSET

    stages = {child.name: child for child in children(spans, span)}
    assert sorted(stages) == ["inference", "preprocess", "queue", "search"]
    inference = dict(stages["inference"].attributes or {})
    assert inference["clipsearch.batch_size"] == 1
    assert inference["clipsearch.model"] == info.model_name
    assert span.start_time is not None and span.end_time is not None
    for child in stages.values():
        assert child.start_time is not None and child.end_time is not None
        assert span.start_time <= child.start_time <= child.end_time <= span.end_time
    # Each stage span lasts what the reply's Timing says.
    timing = result.timing
    for stage, us in (
        ("inference", timing.inference_us),
        ("queue", timing.queue_us),
        ("search", timing.search_us),
    ):
        child = stages[stage]
        assert child.end_time is not None and child.start_time is not None
        assert child.end_time - child.start_time == us * 1000
    assert stages["preprocess"].end_time == stages["queue"].start_time
    assert stages["queue"].end_time == stages["inference"].start_time


def test_a_failed_call_is_an_error_span_with_its_code(
    server: ThreadedServer, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    with Client(server.address) as client, pytest.raises(NotFound):
        client.search("x", collection="missing_collection")
    (span,) = named(spans, SEARCH)
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "NOT_FOUND"
    assert children(spans, span) == []
    assert span.parent is None  # no span was active in the caller: a trace of its own


def test_ingest_has_a_store_write_span_per_item(
    server: ThreadedServer, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    images = [encode(pattern((40 + k, 40), seed=k), "JPEG", quality=90) for k in range(3)]
    items = [IngestItem(id=f"t{k}", image=image) for k, image in enumerate(images)]
    tracer = provider.get_tracer("test")
    with Client(server.address) as client, tracer.start_as_current_span("bulk-load") as caller:
        summary = client.ingest(items, collection="traced").run()
    assert summary.ok == 3
    (span,) = named(spans, INGEST)
    assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
    assert dict(span.attributes or {})["clipsearch.responses"] == 3
    names = sorted(child.name for child in children(spans, span))
    assert names == sorted(["preprocess", "queue", "inference", "store_write"] * 3)


async def test_the_async_client_propagates_the_context_too(
    server: ThreadedServer, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    async with AsyncClient(server.address) as client:
        with provider.get_tracer("test").start_as_current_span("async-caller") as caller:
            await client.count(collection="traced")
    (span,) = named(spans, "clipsearch.v1.ClipSearch/Count")
    assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
    assert [child.name for child in children(spans, span)] == ["search"]


def test_trace_context_is_empty_without_an_active_span() -> None:
    assert trace_context() == ()
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("s") as span:
        (header,) = trace_context()
    context = span.get_span_context()
    flags = int(context.trace_flags)
    assert header == (
        "traceparent",
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}",
    )


def test_the_server_runs_without_opentelemetry_installed(tmp_path: Path) -> None:
    """The [otel] extra is optional: with OpenTelemetry unimportable the server starts,
    the client sends no trace context, and only --otel names the extra to install."""
    code = f"""
import sys
for name in [m for m in sys.modules if m.startswith("opentelemetry")]:
    del sys.modules[name]
sys.modules["opentelemetry"] = None  # import opentelemetry -> ImportError
from clipsearch.client.base import trace_context
from clipsearch.server.app import ClipSearchServer, fake_components
from clipsearch.server.errors import ConfigurationError
from clipsearch.server.settings import Settings
import asyncio
async def main():
    settings = Settings(port=0, milvus_uri={str(tmp_path / "x.db")!r}, metrics_port=0)
    server = ClipSearchServer(settings, fake_components())
    assert server.telemetry is None and trace_context() == ()
    try:
        ClipSearchServer(settings.replace(otel=True), fake_components())
    except ConfigurationError as exc:
        print(exc)
asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "--otel needs OpenTelemetry (opentelemetry is missing): pip install 'clipsearch[otel]'"
    )
