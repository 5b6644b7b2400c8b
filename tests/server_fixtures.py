"""A real ClipSearchServer for client tests, on port 0, in a thread with its own event loop.

The server is asyncio; the sync `Client` blocks. Running the server's loop in a background
thread lets a plain (sync) test call it, and lets a test stop and restart it on the same port
and database in the middle of a client call (the resume tests):

    with ThreadedServer(Settings(port=0, milvus_uri=str(tmp_path / "x.db"))) as server:
        with Client(server.address) as client:
            ...

An asyncio test can use the same object (its loop is not the test's loop).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from clipsearch.server.app import ClipSearchServer, Components
from clipsearch.server.bundle import default_bundle_path
from clipsearch.server.settings import Settings
from clipsearch.v1 import clipsearch_pb2 as pb

T = TypeVar("T")
START_TIMEOUT_S = 120.0


def served_model() -> Path:
    """The bundle the service tests serve: the committed demo model, or the bundle named by
    CLIPSEARCH_TEST_MODEL (to run the model-agnostic tests against another model)."""
    return Path(os.environ.get("CLIPSEARCH_TEST_MODEL") or default_bundle_path())


class ThreadedServer:
    """A ClipSearchServer served from a background thread; `address` once started."""

    def __init__(self, settings: Settings, components: Components | None = None) -> None:
        self.settings = settings
        self.components = components
        self.server: ClipSearchServer | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="clipsearch-test-server", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT_S) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> str:
        """Start (on the previous port after a stop) and wait until SERVING."""

        async def start() -> int:
            settings = self.settings.replace(port=self.port) if self.port else self.settings
            server = ClipSearchServer(settings, self.components)
            self.server = server
            port = await server.start()
            await server.wait_ready()
            return port

        self.port = self.run(start())
        return self.address

    def stop(self, grace: float = 0.0) -> None:
        server, self.server = self.server, None
        if server is not None:
            self.run(server.stop(grace))

    def restart(self) -> None:
        """Stop (calls in flight are cut off) and start again on the same port and store."""
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> ThreadedServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def quick_settings(db_path: Path, model: Path | None = None, **overrides: Any) -> Settings:
    """Settings of a quick test server: port 0, a Milvus Lite file, short batch waits.

    fp32: int8 quantizes activations per batch, so a batch's vectors differ slightly from
    single ones; fp32 keeps "batch == single" exact, which the client tests assert.
    """
    values: dict[str, Any] = {
        "port": 0,
        "precision": "fp32",
        "milvus_uri": str(db_path),
        "model": str(model) if model is not None else "",
        "index_type": "FLAT",
        "max_wait_ms": 2.0,
        "ingest_write_wait_ms": 5.0,
        "grace_period_s": 0.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


def acks_of(responses: Iterable[pb.IngestResponse]) -> list[pb.IngestAck]:
    """The acks of an Ingest call's responses, in the order they came."""
    return [ack for response in responses for ack in response.acks]
