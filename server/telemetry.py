"""What the RPC interceptor reports about each call, to metrics and traces.

`TelemetryInterceptor` (interceptors.py) calls a `Telemetry` when a handler starts, gets a
`CallTelemetry`, tells it of every response and of the final status. The stage times come
from the replies themselves (their `Timing`), read by the service (`service.observations`),
the one module that reads messages; this module turns them into metric samples
(`metrics.py`) and child spans (`tracing.py`, only when tracing is on: OpenTelemetry is an
optional extra and is never imported from here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from clipsearch.server.metrics import ServerMetrics
    from clipsearch.server.tracing import RpcTracer, Span

SERVICE = "clipsearch.v1.ClipSearch"
# Stage spans of one streaming call at most (an ingest of 10,000 items would make 40,000).
MAX_TRACED_MESSAGES = 64
Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Observation:
    """One reply's (or ack's) stage times in microseconds, as its Timing reports them."""

    queue_us: int = 0
    preprocess_us: int = 0
    inference_us: int = 0
    store_us: int = 0
    total_us: int = 0
    batch_size: int = 0
    store_stage: str = "search"  # "store_write" for calls that write
    ingest_outcome: str | None = None  # ok | failed | skipped, for ingest acks

    def stages(self) -> list[tuple[str, int]]:
        """The stages this reply went through, in order. Encoding stages only for items that
        reached a batcher (batch_size > 0): a vector query has none, rather than zeros."""
        stages: list[tuple[str, int]] = []
        if self.batch_size > 0:
            stages += [
                ("preprocess", self.preprocess_us),
                ("queue", self.queue_us),
                ("inference", self.inference_us),
            ]
        if self.store_us > 0:
            stages.append((self.store_stage, self.store_us))
        return stages


# The service's reader: (rpc, response message) → its observations: one per Timing it holds
# (an ingest response holds one per ack), none for a message without one.
Reader = Callable[[str, Any], Sequence[Observation]]


def rpc_name(method: str) -> str:
    """`/clipsearch.v1.ClipSearch/Search` → `Search`; other services keep theirs
    (`grpc.health.v1.Health/Check`)."""
    service, _, name = method.lstrip("/").partition("/")
    return name if service == SERVICE else f"{service}/{name}"


class Telemetry:
    def __init__(
        self, read: Reader, metrics: ServerMetrics | None = None, tracer: RpcTracer | None = None
    ) -> None:
        self.read = read
        self.metrics = metrics
        self.tracer = tracer
        self.model = ""  # set once the model is loaded

    def __call__(self, method: str, metadata: Metadata, accepted: float) -> CallTelemetry:
        """A call whose handler starts now; `accepted`: `perf_counter()` when it reached the
        interceptors."""
        return CallTelemetry(self, method, metadata, accepted)


class CallTelemetry:
    def __init__(
        self, telemetry: Telemetry, method: str, metadata: Metadata, accepted: float
    ) -> None:
        self._t = telemetry
        self.rpc = rpc_name(method)
        self._started = time.perf_counter()
        self._replies = 0
        self._batch_size = 0
        if telemetry.metrics is not None:
            telemetry.metrics.handler_delay(self.rpc, self._started - accepted)
        self._span: Span | None = None
        if telemetry.tracer is not None:
            self._span = telemetry.tracer.start(method, metadata, time.time_ns())

    def message(self, response: Any) -> None:
        """A response is about to be sent."""
        for observed in self._t.read(self.rpc, response):
            self._observe(observed)

    def _observe(self, observed: Observation) -> None:
        self._replies += 1
        self._batch_size = max(self._batch_size, observed.batch_size)
        stages = observed.stages()
        metrics = self._t.metrics
        if metrics is not None:
            metrics.stages(self.rpc, stages)
            if observed.ingest_outcome is not None:
                metrics.ingest_outcome(observed.ingest_outcome)
        if (
            self._t.tracer is not None
            and self._span is not None
            and self._replies <= MAX_TRACED_MESSAGES
        ):
            end = time.time_ns()
            self._t.tracer.stages(
                self._span,
                stages,
                start_ns=end - observed.total_us * 1000,
                end_ns=end,
                batch_size=observed.batch_size,
                model=self._t.model,
            )

    def finish(self, code: grpc.StatusCode) -> None:
        """The call ended with `code` (OK, the handler's abort, CANCELLED, ...)."""
        if self._t.metrics is not None:
            self._t.metrics.rpc(self.rpc, code.name, time.perf_counter() - self._started)
        if self._t.tracer is not None and self._span is not None:
            self._t.tracer.finish(
                self._span,
                code,
                time.time_ns(),
                batch_size=self._batch_size,
                model=self._t.model,
                messages=self._replies,
            )
