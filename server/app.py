"""Assembling and running the server.

Start-up binds the port first and answers health checks NOT_SERVING while the models load
and warm up (so orchestrators see a live but unready process), then SERVING. While serving,
a probe of the vector store every `store_probe_s` turns health NOT_SERVING while the store is
unreachable or out of disk, and SERVING again by itself once it answers (as
text-embeddings-inference ties health to its backend). On SIGINT or SIGTERM health goes
NOT_SERVING and the server drains: ingest streams take no new items, finish what they hold
and end UNAVAILABLE (the client resumes elsewhere or after the restart); calls in flight get
`grace_period_s` to finish, then the batchers, writers and store close.

Several models may be served (`--model NAME=DIR`, repeated; the first is the default): each
gets its own backend, tokenizer, preprocessor and batchers. They load one after another so
that each one's memory (the growth of the process's RSS) and start-up time can be measured;
Info reports both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.bundle import Bundle, Manifest, default_bundle_path, load_bundle
from clipsearch.server.catalog import Catalog, ModelRef
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder
from clipsearch.server.errors import ClipsearchError, ConfigurationError, Unavailable
from clipsearch.server.fake import FakeBackend
from clipsearch.server.ingest import CollectionWriters
from clipsearch.server.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    Interceptor,
    TelemetryInterceptor,
)
from clipsearch.server.limits import is_in_memory_store
from clipsearch.server.metrics import MetricsEndpoint, ServerMetrics
from clipsearch.server.pipeline import EncodingPipeline, InferenceBackend
from clipsearch.server.search import Searcher
from clipsearch.server.security import (
    ListenError,
    bearer_token,
    check_port_free,
    exposure_warning,
    server_credentials,
)
from clipsearch.server.service import ClipSearchService, Runtime, ServedModel, observations
from clipsearch.server.settings import ModelSpec, Settings
from clipsearch.server.store import MilvusStore, VectorStore
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.server.telemetry import Telemetry
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipsearch.server.tracing import RpcTracer

log = logging.getLogger("clipsearch.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClipSearch"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T = TypeVar("T")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


class ServingBackend(InferenceBackend, Protocol):
    """An inference backend that can say how it runs, for Info and the start-up log."""

    @property
    def precision(self) -> str: ...

    @property
    def text_providers(self) -> list[str]: ...

    @property
    def vision_providers(self) -> list[str]: ...


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded and warmed up, with what its loading cost."""

    name: str
    bundle: Bundle
    backend: ServingBackend
    pipeline: EncodingPipeline
    memory_bytes: int
    startup_us: int

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.bundle.manifest.model_id, self.backend.dim)


def rss_bytes() -> int:
    """The process's resident set size now (Linux); elsewhere its peak so far."""
    try:
        statm = Path("/proc/self/statm").read_text(encoding="ascii")
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def weights_bytes(bundle: Bundle, precision: str) -> int:
    """The size of the tower files a model serves at `precision` (0 for a backend that
    serves none): a floor under its memory, since ONNX Runtime holds every initializer. The
    RSS growth alone can read lower when the loads reuse memory the process freed before."""
    variant = bundle.manifest.variants.get(precision)
    if variant is None:
        return 0
    return sum(
        bundle.path(name).stat().st_size for name in (variant.text_file, variant.vision_file)
    )


def _tower(backend: ServingBackend, providers: list[str], settings: Settings) -> pb.TowerInfo:
    return pb.TowerInfo(
        precision=backend.precision, providers=providers, max_batch_size=settings.max_batch_size
    )


def model_message(model: LoadedModel, settings: Settings, is_default: bool) -> pb.ModelInfo:
    manifest, backend = model.bundle.manifest, model.backend
    return pb.ModelInfo(
        name=model.name,
        family=manifest.family,
        source_checkpoint=manifest.source,
        model_id=manifest.model_id,
        dim=manifest.dim,
        context_length=manifest.text.context_length,
        image_size=manifest.vision.image_size,
        text=_tower(backend, backend.text_providers, settings),
        vision=_tower(backend, backend.vision_providers, settings),
        is_default=is_default,
        memory_bytes=model.memory_bytes,
        startup_us=model.startup_us,
    )


def info_message(
    manifest: Manifest,
    backend: ServingBackend,
    settings: Settings,
    store: str,
    models: list[LoadedModel] | None = None,
) -> pb.InfoResponse:
    """Info: the default model (`manifest`, `backend`) in the top-level fields, and every
    model served in `models`."""
    return pb.InfoResponse(
        model_name=manifest.name if not models else models[0].name,
        model_family=manifest.family,
        source_checkpoint=manifest.source,
        dim=manifest.dim,
        context_length=manifest.text.context_length,
        image_size=manifest.vision.image_size,
        text=_tower(backend, backend.text_providers, settings),
        vision=_tower(backend, backend.vision_providers, settings),
        version=_version("clipsearch"),
        versions={
            name: _version(name)
            for name in ("onnxruntime", "pymilvus", "milvus-lite", "grpcio", "tokenizers")
        },
        store=store,
        model_id=manifest.model_id,
        models=[model_message(m, settings, i == 0) for i, m in enumerate(models or [])],
    )


def spec_bundle(spec: ModelSpec) -> Bundle:
    return load_bundle(spec.path or default_bundle_path())


def served_bundle(settings: Settings) -> Bundle:
    """The bundle of the default (first) model of `settings`."""
    return spec_bundle(settings.model_specs[0])


@dataclass
class Components:
    """Factories for the heavy parts, replaceable in tests. The tokenizer and the image
    preprocessor always come from the served bundle; `encoder` makes the inference backend
    of the model in `settings.model` (called once per served model, with
    `settings.for_model(spec)`: `served_bundle` of those settings is that model's bundle)."""

    encoder: Callable[[Settings], ServingBackend]
    store: Callable[[Settings], VectorStore]
    # With --otel: an OpenTelemetry TracerProvider (tests: one with an in-memory exporter);
    # None: the process's configured provider, else OTLP (`tracing.default_provider`).
    tracer_provider: Any = None


def default_components() -> Components:
    def encoder(settings: Settings) -> OnnxEncoder:
        return OnnxEncoder(served_bundle(settings), EncoderOptions.from_settings(settings))

    return Components(encoder=encoder, store=open_store)


def open_store(settings: Settings) -> VectorStore:
    """The store `milvus_uri` names: Milvus (Lite or a server), or one in this process's memory."""
    if is_in_memory_store(settings.milvus_uri):
        return InMemoryStore()
    return MilvusStore.from_settings(settings)


def fake_components(fail_when: Callable[[np.ndarray], bool] | None = None) -> Components:
    """A `FakeBackend` for the served bundle and a fresh `InMemoryStore` per start: the whole
    service, with the bundle's real tokenizer and preprocessing, without ONNX Runtime or
    Milvus. For tests; `fail_when` is passed on to the backend."""

    def encoder(settings: Settings) -> FakeBackend:
        return FakeBackend.for_manifest(served_bundle(settings).manifest, fail_when)

    return Components(encoder=encoder, store=lambda settings: InMemoryStore())


def _store_kind(store: VectorStore, settings: Settings) -> str:
    if isinstance(store, InMemoryStore):
        return "memory"
    return "milvus-lite" if settings.uses_milvus_lite else "milvus"


class ClipSearchServer:
    def __init__(self, settings: Settings, components: Components | None = None) -> None:
        self.settings = settings
        self.components = components or default_components()
        self.service = ClipSearchService(settings)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lag
        self.port = 0
        self.startup_error: BaseException | None = None
        self._ready = asyncio.Event()
        self._warm_task: asyncio.Task[None] | None = None
        self._token = bearer_token(settings)
        self._credentials = server_credentials(settings)
        self.metrics = ServerMetrics() if settings.metrics_port else None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._loop_watch: asyncio.Task[None] | None = None
        self._owned_provider: Any = None
        tracer = self._tracer(settings)
        self.telemetry: Telemetry | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self.store_healthy = True
        interceptors: list[Interceptor] = [ErrorInterceptor()]
        if self._token:
            interceptors.insert(0, AuthInterceptor(self._token))
        if self.metrics is not None or tracer is not None:
            self.telemetry = Telemetry(observations, self.metrics, tracer)
            interceptors.insert(0, TelemetryInterceptor(self.telemetry))
        max_bytes = settings.max_message_mb * 1024 * 1024
        self.grpc_server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                # gRPC's default SO_REUSEPORT lets a second server bind this port and take
                # half of the calls; a taken port must be an error.
                ("grpc.so_reuseport", 0),
            ],
        )

    def _tracer(self, settings: Settings) -> RpcTracer | None:
        if not settings.otel:
            return None
        try:  # OpenTelemetry is an optional extra: imported only when asked for
            from clipsearch.server.tracing import RpcTracer, default_provider  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigurationError(
                f"--otel needs OpenTelemetry ({exc.name} is missing): "
                "pip install 'clipsearch[otel]'"
            ) from None
        provider = self.components.tracer_provider
        if provider is None:
            provider, owned = default_provider()
            self._owned_provider = provider if owned else None
        return RpcTracer(provider)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING); warm up in the background."""
        # The generated service module has no annotations.
        pb_grpc.add_ClipSearchServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, NOT_SERVING)
        self.port = self._listen()
        if self.metrics is not None:
            await self._serve_metrics(self.metrics)
        await self.grpc_server.start()
        log.info(
            "listening on %s%s; loading the model",
            self.address,
            " (mutual TLS)"
            if self.settings.tls_client_ca
            else " (TLS)"
            if self.settings.tls
            else "",
        )
        warning = exposure_warning(self.settings.replace(port=self.port), self._token)
        if warning:
            log.warning("%s", warning)
        self._warm_task = asyncio.create_task(self._warm_up())
        return self.port

    async def _serve_metrics(self, metrics: ServerMetrics) -> None:
        host, port = self.settings.host, self.settings.metrics_port
        try:
            self.metrics_endpoint = metrics.serve(host, port)
        except OSError as exc:
            await self.grpc_server.stop(0)
            raise ListenError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._loop_watch = asyncio.create_task(metrics.watch_event_loop())
        log.info("metrics on http://%s:%d/metrics", host, self.metrics_endpoint.port)

    def _listen(self) -> int:
        host, port = self.settings.host, self.settings.port
        check_port_free(host, port)
        address = f"{host}:{port}"
        try:
            if self._credentials is None:
                bound = self.grpc_server.add_insecure_port(address)
            else:
                bound = self.grpc_server.add_secure_port(address, self._credentials)
        except RuntimeError:  # gRPC says only "Failed to bind"; its own log line says why
            bound = 0
        if bound == 0:
            raise ListenError(f"cannot listen on {address}")
        return bound

    async def _load_model(self, spec: ModelSpec, taken: dict[str, str]) -> LoadedModel:
        """Load, warm up and start one model; `taken` maps the names and model ids of the
        models loaded before it (two models may share neither)."""
        settings = self.settings.for_model(spec)
        rss_before, started = rss_bytes(), time.perf_counter()
        bundle = await _in_daemon_thread(spec_bundle, spec)
        manifest = bundle.manifest
        name = spec.name or manifest.name
        for key, what in ((name, "name"), (manifest.model_id, "model_id")):
            if key in taken:
                raise ConfigurationError(
                    f"models {taken[key]!r} and {name!r} have the same {what} {key!r}: "
                    "serve each model once, under distinct names"
                )
        backend = await _in_daemon_thread(self.components.encoder, settings)
        if backend.dim != manifest.dim:
            raise ConfigurationError(
                f"the inference backend makes {backend.dim}-d vectors, the bundle "
                f"{manifest.name} {manifest.dim}-d"
            )
        pipeline = EncodingPipeline.from_settings(backend, bundle, settings)
        await pipeline.start()
        taken.update({name: name, manifest.model_id: name})
        return LoadedModel(
            name=name,
            bundle=bundle,
            backend=backend,
            pipeline=pipeline,
            memory_bytes=max(rss_bytes() - rss_before, weights_bytes(bundle, backend.precision)),
            startup_us=int((time.perf_counter() - started) * 1e6),
        )

    async def _warm_up(self) -> None:
        settings = self.settings
        loaded: list[LoadedModel] = []
        try:
            taken: dict[str, str] = {}
            for spec in settings.model_specs:
                loaded.append(await self._load_model(spec, taken))
            store = AsyncStore(await _in_daemon_thread(self.components.store, settings))
            default = loaded[0]
            if self.telemetry is not None:
                self.telemetry.model = default.name
            if self.metrics is not None:
                self.metrics.watch_store(store)
            for m in loaded:
                self._observe(m.name, m.bundle.manifest, m.backend, m.pipeline)
            self.service.runtime = Runtime(
                settings=settings,
                models={
                    m.name: ServedModel(m.ref, m.pipeline, Searcher(m.pipeline, store))
                    for m in loaded
                },
                store=store,
                catalog=Catalog(store, [m.ref for m in loaded], settings.max_collections),
                writers=CollectionWriters(
                    store,
                    batch=settings.ingest_write_batch,
                    wait_ms=settings.ingest_write_wait_ms,
                    max_queue=settings.max_queue,
                    retry_s=settings.store_retry_s,
                    # Milvus Lite applies one write at a time: a second batch would only wait.
                    workers=1 if settings.uses_milvus_lite else settings.ingest_write_concurrency,
                ),
                info=info_message(
                    default.bundle.manifest,
                    default.backend,
                    settings,
                    _store_kind(store.store, settings),
                    loaded,
                ),
            )
        except asyncio.CancelledError:  # stopped while starting: `stop` reports it
            await _close_pipelines(loaded)
            raise
        except BaseException as exc:
            await _close_pipelines(loaded)
            self.startup_error = exc
            log.error("start-up failed: %s", exc, exc_info=not isinstance(exc, Exception))
            self._ready.set()
            return
        for service in ("", SERVICE_NAME):
            await self.health.set(service, SERVING)
        if settings.store_probe_s > 0:
            self._probe_task = asyncio.create_task(self._probe_store(store))
        for m in loaded:
            log.info(
                "serving %s%s on %s (%s, text on %s; %.0f MiB, %.2f s to load and warm up)",
                m.name,
                " (default)" if m is default and len(loaded) > 1 else "",
                self.address,
                m.backend.precision,
                m.backend.text_providers[0],
                m.memory_bytes / 2**20,
                m.startup_us / 1e6,
            )
        self._ready.set()

    def _observe(
        self, name: str, manifest: Manifest, backend: ServingBackend, pipeline: EncodingPipeline
    ) -> None:
        if self.metrics is None:
            return
        self.metrics.watch_towers(pipeline.batchers, name)
        self.metrics.set_model(
            name,
            manifest.family,
            {
                "text": (backend.precision, backend.text_providers),
                "vision": (backend.precision, backend.vision_providers),
            },
        )

    async def _probe_store(self, store: AsyncStore) -> None:
        """Health follows the store: NOT_SERVING while its probe fails, SERVING once it
        passes again (the probe also loads collections a restarted Milvus released)."""
        while True:
            await asyncio.sleep(self.settings.store_probe_s)
            try:
                await store.check_health()
            except ClipsearchError as exc:
                problem = str(exc)
            except Exception as exc:  # a bug in the probe must not end the probing
                log.exception("the vector store probe failed")
                problem = type(exc).__name__
            else:
                problem = ""
            if bool(problem) == (not self.store_healthy):
                continue
            self.store_healthy = not problem
            if problem:
                log.warning("vector store unhealthy (%s): health NOT_SERVING", problem)
            else:
                log.info("vector store healthy again: health SERVING")
            for service in ("", SERVICE_NAME):
                await self.health.set(service, NOT_SERVING if problem else SERVING)

    async def wait_ready(self) -> None:
        """Wait until SERVING; raises the start-up error if warming up failed."""
        await self._ready.wait()
        if self.startup_error is not None:
            raise self.startup_error

    async def stop(self, grace: float | None = None) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        if self.service.runtime is not None:
            self.service.runtime.writers.drain()
        grace = self.settings.grace_period_s if grace is None else grace
        await self.grpc_server.stop(grace)
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
            await asyncio.gather(self._warm_task, return_exceptions=True)
            self.startup_error = Unavailable("the server stopped before it was ready")
            self._ready.set()
        runtime, self.service.runtime = self.service.runtime, None
        if runtime is not None:
            await runtime.writers.close()
            for model in runtime.models.values():
                await model.pipeline.close()
            await runtime.store.close()
        if self._loop_watch is not None:
            self._loop_watch.cancel()
            await asyncio.gather(self._loop_watch, return_exceptions=True)
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)
            self.metrics_endpoint = None
        if self._owned_provider is not None:  # flush the spans still batched
            await asyncio.to_thread(self._owned_provider.shutdown)
        log.info("stopped")


async def _close_pipelines(models: list[LoadedModel]) -> None:
    for model in models:
        await model.pipeline.close()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_dependencies()


def quiet_dependencies() -> None:
    """The one place that turns down other libraries' logs."""
    # pymilvus logs every failed call with a traceback at ERROR; the store turns each into a
    # domain error that the service reports, so that log would only repeat it.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    # faiss (under Milvus Lite) logs which CPU build it loads, at INFO, on every start.
    logging.getLogger("faiss").setLevel(logging.WARNING)


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread` on a daemon thread: a signal during start-up ends the process at
    once instead of waiting (at interpreter exit) for the model or the store to finish
    loading."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"start-up:{fn.__name__}", daemon=True).start()
    return await future


async def serve(settings: Settings, ready_file: Path | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code: 0 after a drain, 1 if
    start-up failed, 128 + the signal's number if a signal came before the server was
    ready."""
    server = ClipSearchServer(settings)
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    ready = asyncio.create_task(server.wait_ready())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        log.warning("%s before the server was ready: stopping", received[0].name)
        ready.cancel()
        await server.stop(grace=0)
        return 128 + received[0].value
    if ready.exception() is not None:
        await server.stop(grace=0)
        return 1
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, server.address + "\n", "utf-8")
    await stopping
    ready.cancel()
    log.info("shutting down (grace %.1fs)", settings.grace_period_s)
    await server.stop()
    return 0
