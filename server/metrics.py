"""Prometheus metrics of one server, in a registry of its own.

Nothing here reaches into the domain code: the batchers and the store expose hooks
(`MicroBatcher.on_batch`, `AsyncStore.on_call`) and live counters (`BatcherStats`, the queue
lengths), the RPC interceptor reports each call (`telemetry.py`), and this module records them.
One `CollectorRegistry` per server, never the process-wide default, so two servers in one
process (the tests) keep their figures apart. The names, labels and meanings are in
docs/OBSERVABILITY.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.batcher import MicroBatcher, Priority
from clipsearch.server.errors import ClipsearchError

log = logging.getLogger(__name__)

# Seconds: from a cache-warm vector search (sub-millisecond) to a backlog of seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOOP_LAG_INTERVAL_S = 0.1
PRIORITY_LABELS = {Priority.INTERACTIVE: "interactive", Priority.BULK: "bulk"}


def error_code(exc: BaseException) -> str:
    """The status name a store exception would reach the client as."""
    if isinstance(exc, ClipsearchError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clipsearch_requests", "RPCs finished, by method and status code",
            ["rpc", "code"], registry=r,
        )  # fmt: skip
        self.rpc_seconds = Histogram(
            "clipsearch_rpc_duration_seconds", "handler start to the call's end, per RPC",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.handler_delay_seconds = Histogram(
            "clipsearch_rpc_handler_delay_seconds",
            "from the call reaching the server's interceptors to its handler starting "
            "(reading and decoding the request, waiting for the event loop)",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "clipsearch_stage_duration_seconds",
            "time per stage of each reply (queue, preprocess, inference, search, store_write)",
            ["rpc", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "clipsearch_batch_size", "items per inference batch, per tower",
            ["tower"], buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "clipsearch_inference_duration_seconds", "one inference batch's run, per tower",
            ["tower", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ingest_items = Counter(
            "clipsearch_ingest_items", "ingested items by outcome (ok, failed, skipped)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.store_seconds = Histogram(
            "clipsearch_store_call_duration_seconds", "vector store calls, per operation",
            ["operation"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            "clipsearch_store_errors", "vector store calls that raised, by operation and code",
            ["operation", "code"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "clipsearch_model_info", "the served model, one series per tower (value 1)",
            ["tower", "name", "family", "precision", "provider"], registry=r,
        )  # fmt: skip
        self.loop_lag_seconds = Histogram(
            "clipsearch_event_loop_lag_seconds",
            f"how late a {LOOP_LAG_INTERVAL_S}s timer of the server's event loop fires",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._towers: dict[str, MicroBatcher[Any, Any]] = {}
        r.register(_BatcherCollector(lambda: self._towers))

    # --- wiring ------------------------------------------------------------------------

    def watch_towers(self, batchers: Mapping[str, MicroBatcher[Any, Any]], model: str) -> None:
        """Record each tower batcher's batches, and report its queues and counters live.
        The first model's towers are named `text`/`vision`; a further model's `MODEL:text`."""
        first = not self._towers
        for tower, batcher in batchers.items():
            key = tower if first else f"{model}:{tower}"
            batcher.on_batch = self._batch_hook(key, model)
            self._towers[key] = batcher

    def watch_store(self, store: AsyncStore) -> None:
        store.on_call = self.store_call

    def set_model(
        self, name: str, family: str, towers: Mapping[str, tuple[str, Sequence[str]]]
    ) -> None:
        """`towers`: tower → (precision, providers in order); the first provider runs it.
        Called once per served model."""
        for tower, (precision, providers) in towers.items():
            provider = providers[0] if providers else ""
            self.model_info.labels(tower, name, family, precision, provider).set(1)

    def _batch_hook(self, tower: str, model: str) -> Callable[[int, float], None]:
        sizes = self.batch_size.labels(tower)
        runs = self.inference_seconds.labels(tower, model)

        def on_batch(items: int, seconds: float) -> None:
            sizes.observe(items)
            runs.observe(seconds)

        return on_batch

    # --- recording ---------------------------------------------------------------------

    def rpc(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.rpc_seconds.labels(rpc).observe(seconds)

    def handler_delay(self, rpc: str, seconds: float) -> None:
        self.handler_delay_seconds.labels(rpc).observe(seconds)

    def stages(self, rpc: str, stages: Iterable[tuple[str, int]]) -> None:
        """Stage times of one reply or ack, in microseconds."""
        for stage, us in stages:
            self.stage_seconds.labels(rpc, stage).observe(us / 1e6)

    def ingest_outcome(self, outcome: str) -> None:
        self.ingest_items.labels(outcome).inc()

    def store_call(self, operation: str, seconds: float, exc: BaseException | None) -> None:
        self.store_seconds.labels(operation).observe(seconds)
        if exc is not None:
            self.store_errors.labels(operation, error_code(exc)).inc()

    async def watch_event_loop(self, interval: float = LOOP_LAG_INTERVAL_S) -> None:
        """Until cancelled: how late the loop runs a timer, a measure of its backlog."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - due))

    # --- exposition --------------------------------------------------------------------

    def text(self) -> bytes:
        """The exposition text, as the endpoint serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


class MetricsEndpoint:
    """The HTTP server of /metrics (prometheus_client's, in a daemon thread)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _BatcherCollector:
    """The batchers' live figures at scrape time: no hook on the hot path for counters the
    batcher keeps anyway."""

    def __init__(self, towers: Callable[[], Mapping[str, MicroBatcher[Any, Any]]]) -> None:
        self._towers = towers

    def collect(self) -> Iterable[Metric]:
        towers = self._towers()
        depth = GaugeMetricFamily(
            "clipsearch_queue_depth", "items queued per tower and priority",
            labels=["tower", "priority"],
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "clipsearch_batcher_dropped_items",
            "items dropped before inference: caller gone (cancelled) or deadline passed (expired)",
            labels=["tower", "reason"],
        )
        batches = CounterMetricFamily(
            "clipsearch_batcher_batches", "inference batches run", labels=["tower"]
        )
        items = CounterMetricFamily(
            "clipsearch_batcher_items", "items run in inference batches", labels=["tower"]
        )
        failed = CounterMetricFamily(
            "clipsearch_batcher_failed_batches", "batches whose inference raised", labels=["tower"]
        )
        rejected = CounterMetricFamily(
            "clipsearch_batcher_rejected_requests",
            "submissions refused because the queue was full (RESOURCE_EXHAUSTED)",
            labels=["tower"],
        )
        for tower, batcher in towers.items():
            for priority, label in PRIORITY_LABELS.items():
                depth.add_metric([tower, label], batcher.queued_at(priority))
            stats = batcher.stats
            dropped.add_metric([tower, "cancelled"], stats.dropped_cancelled)
            dropped.add_metric([tower, "expired"], stats.dropped_expired)
            batches.add_metric([tower], stats.batches)
            items.add_metric([tower], stats.items)
            failed.add_metric([tower], stats.failed_batches)
            rejected.add_metric([tower], stats.rejected_overload)
        return [depth, dropped, batches, items, failed, rejected]
