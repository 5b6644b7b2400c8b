"""The clipsearch servers behind the web process: one `AsyncClient` each, opened on first use
in the event loop that serves the requests, and the model each serves (asked once)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.client import AsyncClient, NotFound, ServerInfo, TlsConfig


@dataclass(frozen=True)
class WebConfig:
    """What `clipsearch web` is started with. `servers[0]` answers requests that name no
    server; the others are there to compare models side by side."""

    servers: tuple[str, ...]
    timeout: float = 30.0
    token: str | None = None
    tls: TlsConfig | None = None
    media_root: Path | None = None
    thumbnail_cache_mb: int = 64

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("give at least one server address")


@dataclass
class Backend:
    index: int
    address: str
    client: AsyncClient
    info: ServerInfo | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def server_info(self) -> ServerInfo:
        """The served model, asked once; a failure is raised and asked again next time."""
        async with self._lock:
            if self.info is None:
                self.info = await self.client.info()
            return self.info

    def model_names(self) -> set[str]:
        if self.info is None:
            return set()
        return {self.info.model_name, self.info.model_id, self.info.source_checkpoint} - {""}


class Backends:
    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self._backends: list[Backend] | None = None

    def _open(self) -> list[Backend]:
        if self._backends is None:
            self._backends = [
                Backend(
                    index,
                    address,
                    AsyncClient(
                        address,
                        timeout=self.config.timeout,
                        token=self.config.token,
                        tls=self.config.tls,
                    ),
                )
                for index, address in enumerate(self.config.servers)
            ]
        return self._backends

    def all(self) -> list[Backend]:
        return list(self._open())

    def get(self, index: int) -> Backend:
        backends = self._open()
        if not 0 <= index < len(backends):
            raise NotFound(f"no server {index}: this page has servers 0 to {len(backends) - 1}")
        return backends[index]

    async def by_model(self, model: str) -> Backend:
        """The first server whose model is named `model` (its name, id or checkpoint); the
        first server when `model` is empty."""
        backends = self._open()
        if not model:
            return backends[0]
        served = []
        for backend in backends:
            info = await backend.server_info()
            if model in backend.model_names():
                return backend
            served.append(info.model_name)
        raise NotFound(f"model {model!r} is not served here; served: {', '.join(served)}")

    async def close(self) -> None:
        backends, self._backends = self._backends, None
        for backend in backends or ():
            await backend.client.close()
