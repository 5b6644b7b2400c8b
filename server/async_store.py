"""The vector store, callable from the event loop.

pymilvus is synchronous: every call runs in a small dedicated thread pool, which also bounds
how many requests hit Milvus at once. Each call returns its result and the microseconds it
took, for the Timing of the response, and tells `on_call` (metrics) of every call: the
operation, its seconds, and the exception it raised, if any.

`retry_unavailable` is the store's one retry policy: while the store is unreachable a write
is tried again with exponential backoff for a bounded time (`store_retry_s`), then its
Unavailable goes up (ingest ends the stream and the client resumes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from clipsearch.server.errors import Unavailable
from clipsearch.server.store import CollectionInfo, StoredItem, StoreHit, Target, VectorStore

T = TypeVar("T")

# operation (the VectorStore method's name), seconds, the exception raised or None.
StoreHook = Callable[[str, float, BaseException | None], None]

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0


async def retry_unavailable(
    call: Callable[[], Awaitable[T]],
    within_s: float,
    what: str,
    stop: Callable[[], bool] = lambda: False,
) -> T:
    """`call()`, tried again with exponential backoff (0.1 s doubling to 2 s) while it raises
    Unavailable, for at most `within_s` seconds or until `stop()`; then its last error."""
    deadline = time.monotonic() + within_s
    delay = RETRY_INITIAL_S
    failures = 0
    while True:
        try:
            result = await call()
        except Unavailable as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop():
                raise
            failures += 1
            if failures == 1:
                log.warning("%s: %s; retrying for up to %.0f s", what, exc, remaining)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if failures:
            log.info("%s: succeeded after %d retries", what, failures)
        return result


class AsyncStore:
    def __init__(self, store: VectorStore, threads: int = 4) -> None:
        self.store = store
        self.on_call: StoreHook | None = None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="store")

    async def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, int]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except BaseException as exc:
            self._observe(fn, time.perf_counter() - started, exc)
            raise
        seconds = time.perf_counter() - started
        self._observe(fn, seconds, None)
        return result, int(seconds * 1e6)

    def _observe(
        self, fn: Callable[..., object], seconds: float, exc: BaseException | None
    ) -> None:
        if self.on_call is not None:
            self.on_call(getattr(fn, "__name__", "call"), seconds, exc)

    async def search(
        self,
        collection: str,
        vector: np.ndarray,
        target: Target,
        top_k: int,
        *,
        offset: int = 0,
        filter: str = "",
        output_fields: Sequence[str] = (),
        params: Mapping[str, float] | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> tuple[list[StoreHit], int]:
        return await self._call(
            self.store.search,
            collection,
            vector,
            target,
            top_k,
            offset=offset,
            filter=filter,
            output_fields=output_fields,
            params=params,
            exclude_ids=exclude_ids,
        )

    async def get(
        self, collection: str, ids: Sequence[str], include_vectors: bool = False
    ) -> tuple[list[StoredItem], int]:
        return await self._call(self.store.get, collection, ids, include_vectors=include_vectors)

    async def existing_ids(self, collection: str, ids: Sequence[str]) -> tuple[set[str], int]:
        return await self._call(self.store.existing_ids, collection, ids)

    async def upsert(self, collection: str, items: Sequence[StoredItem]) -> tuple[None, int]:
        return await self._call(self.store.upsert, collection, items)

    async def delete(self, collection: str, ids: Sequence[str]) -> tuple[int, int]:
        return await self._call(self.store.delete, collection, ids)

    async def count(self, collection: str, filter: str = "") -> tuple[int, int]:
        return await self._call(self.store.count, collection, filter)

    async def describe(self, collection: str) -> tuple[CollectionInfo, int]:
        return await self._call(self.store.describe, collection)

    async def create_collection(
        self, name: str, dim: int, model_id: str, exist_ok: bool = False
    ) -> tuple[bool, int]:
        return await self._call(self.store.create_collection, name, dim, model_id, exist_ok)

    async def drop_collection(self, name: str) -> tuple[None, int]:
        return await self._call(self.store.drop_collection, name)

    async def list_collections(self) -> tuple[list[CollectionInfo], int]:
        return await self._call(self.store.list_collections)

    async def check_health(self) -> None:
        """The store's own probe where it has one (`MilvusStore.check_health`)."""
        check: Callable[[], None] | None = getattr(self.store, "check_health", None)
        if check is not None:
            await self._call(check)

    async def close(self) -> None:
        await self._call(self.store.close)
        self._pool.shutdown(wait=True)
