"""Assembling and running the server.

Start-up binds the port first and answers health checks NOT_SERVING while the model loads
and warms up (so orchestrators see a live but unready process), then SERVING. On SIGINT or
SIGTERM health goes NOT_SERVING, calls in flight get `grace_period_s` to finish, then the
batchers, writers and store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.bundle import Bundle, Manifest, default_bundle_path, load_bundle
from clipsearch.server.catalog import Catalog
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder
from clipsearch.server.errors import ConfigurationError, Unavailable
from clipsearch.server.fake import FakeBackend
from clipsearch.server.ingest import CollectionWriters
from clipsearch.server.interceptors import AuthInterceptor, ErrorInterceptor, Interceptor
from clipsearch.server.pipeline import EncodingPipeline, InferenceBackend
from clipsearch.server.search import Searcher
from clipsearch.server.security import (
    ListenError,
    bearer_token,
    check_port_free,
    exposure_warning,
    server_credentials,
)
from clipsearch.server.service import ClipSearchService, Runtime
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore, VectorStore
from clipsearch.server.store.memory import InMemoryStore
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

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


def info_message(
    manifest: Manifest, backend: ServingBackend, settings: Settings, store: str
) -> pb.InfoResponse:
    return pb.InfoResponse(
        model_name=manifest.name,
        model_family=manifest.family,
        source_checkpoint=manifest.source,
        dim=manifest.dim,
        context_length=manifest.text.context_length,
        image_size=manifest.vision.image_size,
        text=pb.TowerInfo(
            precision=backend.precision,
            providers=backend.text_providers,
            max_batch_size=settings.max_batch_size,
        ),
        vision=pb.TowerInfo(
            precision=backend.precision,
            providers=backend.vision_providers,
            max_batch_size=settings.max_batch_size,
        ),
        version=_version("clipsearch"),
        versions={
            name: _version(name)
            for name in ("onnxruntime", "pymilvus", "milvus-lite", "grpcio", "tokenizers")
        },
        store=store,
        model_id=manifest.model_id,
    )


def served_bundle(settings: Settings) -> Bundle:
    return load_bundle(settings.model or default_bundle_path())


@dataclass
class Components:
    """Factories for the heavy parts, replaceable in tests. The tokenizer and the image
    preprocessor always come from the served bundle; `encoder` makes the inference backend."""

    encoder: Callable[[Settings], ServingBackend]
    store: Callable[[Settings], VectorStore]


def default_components() -> Components:
    def encoder(settings: Settings) -> OnnxEncoder:
        return OnnxEncoder(served_bundle(settings), EncoderOptions.from_settings(settings))

    return Components(encoder=encoder, store=MilvusStore.from_settings)


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
        interceptors: list[Interceptor] = [ErrorInterceptor()]
        if self._token:
            interceptors.insert(0, AuthInterceptor(self._token))
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

    async def _warm_up(self) -> None:
        settings = self.settings
        try:
            bundle = await _in_daemon_thread(served_bundle, settings)
            backend = await _in_daemon_thread(self.components.encoder, settings)
            if backend.dim != bundle.manifest.dim:
                raise ConfigurationError(
                    f"the inference backend makes {backend.dim}-d vectors, the bundle "
                    f"{bundle.manifest.name} {bundle.manifest.dim}-d"
                )
            store = AsyncStore(await _in_daemon_thread(self.components.store, settings))
            pipeline = EncodingPipeline.from_settings(backend, bundle, settings)
            await pipeline.start()
            self.service.runtime = Runtime(
                settings=settings,
                pipeline=pipeline,
                store=store,
                catalog=Catalog(
                    store, bundle.manifest.model_id, backend.dim, settings.max_collections
                ),
                searcher=Searcher(pipeline, store),
                writers=CollectionWriters(
                    store,
                    batch=settings.ingest_write_batch,
                    wait_ms=settings.ingest_write_wait_ms,
                    max_queue=settings.max_queue,
                    # Milvus Lite applies one write at a time: a second batch would only wait.
                    workers=1 if settings.uses_milvus_lite else settings.ingest_write_concurrency,
                ),
                info=info_message(
                    bundle.manifest, backend, settings, _store_kind(store.store, settings)
                ),
            )
        except asyncio.CancelledError:  # stopped while starting: `stop` reports it
            raise
        except BaseException as exc:
            self.startup_error = exc
            log.error("start-up failed: %s", exc, exc_info=not isinstance(exc, Exception))
            self._ready.set()
            return
        for service in ("", SERVICE_NAME):
            await self.health.set(service, SERVING)
        log.info(
            "serving %s on %s (%s, text on %s)",
            bundle.manifest.name,
            self.address,
            backend.precision,
            backend.text_providers[0],
        )
        self._ready.set()

    async def wait_ready(self) -> None:
        """Wait until SERVING; raises the start-up error if warming up failed."""
        await self._ready.wait()
        if self.startup_error is not None:
            raise self.startup_error

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
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
            await runtime.pipeline.close()
            await runtime.store.close()
        log.info("stopped")


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
