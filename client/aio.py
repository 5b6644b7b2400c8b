# The per-call `timeout` of these coroutines is the gRPC deadline sent to the server, not an
# asyncio timeout around them, and it mirrors the sync client's API.
# ruff: noqa: ASYNC109
"""The asyncio client: `Client`'s API with `async` methods and async iterators.

    from clipsearch.client import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.search("a red circle")
        async for ack in client.ingest(items):
            ...

Same channel (options, retries, TLS, token) and the same request building, parsing and
ingest state machine as the sync client; only the waiting differs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
    Sized,
)
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import numpy as np

from clipsearch.client import convert
from clipsearch.client.base import ClientBase, profile_description, profiled_rpc
from clipsearch.client.channel import TlsConfig, bind_methods
from clipsearch.client.errors import ClipsearchError, Unavailable, from_rpc_error
from clipsearch.client.ingest import AsyncIngestStream, Backoff
from clipsearch.client.profile import Profile, Sample
from clipsearch.client.sources import open_source
from clipsearch.client.types import (
    CollectionInfo,
    EncodeResult,
    ImageInput,
    IngestItem,
    IngestSummary,
    Item,
    SearchResult,
    ServerInfo,
    Target,
)
from clipsearch.v1 import clipsearch_pb2 as pb

T = TypeVar("T")


class AsyncClient(ClientBase):
    """An asyncio clipsearch client (arguments as `Client`); `async with` or `await close()`.

    Create it inside the event loop that uses it.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: TlsConfig | None = None,
        max_message_mb: int = 64,
        retry: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            address,
            timeout=timeout,
            token=token,
            tls=tls,
            max_message_mb=max_message_mb,
            retry=retry,
            options=options,
        )
        self._channel = self.channel_config.aio_channel()
        self._methods = bind_methods(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, rpc: convert.Rpc[Any, T], timeout: float | None) -> T:
        try:
            response = await self._methods[rpc.method](
                rpc.request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return rpc.parse(response)

    # --- model ---------------------------------------------------------------------------

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served model, its precision and execution providers, and versions."""
        return await self._call(convert.info_rpc(), timeout)

    async def wait_until_ready(self, timeout: float = 60.0) -> ServerInfo:
        """Wait for the server to answer (it says UNAVAILABLE while warming up); raises
        Unavailable if it does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return await self.info(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except ClipsearchError as exc:
                if not exc.retryable and exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"the server at {self.address} was not ready within {timeout:g} s: "
                        f"{exc.message}"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def encode_texts(
        self, texts: Sequence[str], *, timeout: float | None = None
    ) -> EncodeResult:
        """Texts to embeddings, [len(texts), dim] float32, in input order."""
        return await self._call(convert.texts_rpc(texts), timeout)

    async def encode_images(
        self, images: Sequence[ImageInput], *, timeout: float | None = None
    ) -> EncodeResult:
        """Images (encoded bytes, or paths of image files) to embeddings, in input order."""
        rpc = await asyncio.to_thread(convert.images_rpc, images)  # may read files
        return await self._call(rpc, timeout)

    async def encode_stream(
        self,
        batches: Iterable[Sequence[str | bytes]] | AsyncIterable[Sequence[str | bytes]],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[EncodeResult]:
        """Many encode requests over one stream; results in request order (see
        `Client.encode_stream`: failed batches come back with `.error` set)."""
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[pb.EncodeRequest]:
            try:
                request_id = 0
                if isinstance(batches, AsyncIterable):
                    async for batch in batches:
                        yield convert.encode_request(batch, request_id)
                        request_id += 1
                else:
                    for batch in batches:
                        yield convert.encode_request(batch, request_id)
                        request_id += 1
            except Exception as exc:  # surfaced to the caller after the stream ends
                failure.append(exc)

        call = self._methods["EncodeStream"](requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield convert.encode_result(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    # --- search --------------------------------------------------------------------------

    async def search(
        self,
        text: str | None = None,
        *,
        image: ImageInput | None = None,
        vector: np.ndarray | Sequence[float] | None = None,
        like: str | None = None,
        target: Target = "image",
        top_k: int = 10,
        offset: int = 0,
        filter: str = "",
        output_fields: Sequence[str] = (),
        params: Mapping[str, float] | None = None,
        collection: str | None = None,
        timeout: float | None = None,
    ) -> SearchResult:
        """Nearest neighbours of exactly one query (see `Client.search`)."""
        request = convert.search_request(
            text,
            image=image,
            vector=vector,
            like=like,
            target=target,
            top_k=top_k,
            offset=offset,
            filter=filter,
            output_fields=output_fields,
            params=params,
            collection=collection,
        )
        return await self._call(convert.search_rpc(request), timeout)

    # --- ingest --------------------------------------------------------------------------

    def ingest(
        self,
        items: Iterable[IngestItem] | AsyncIterable[IngestItem],
        *,
        collection: str | None = None,
        create_collection: bool = True,
        skip_existing: bool = False,
        progress: bool = False,
        total: int | None = None,
        window: int = 256,
        max_attempts: int = 5,
        timeout: float | None = None,
        backoff: Backoff | None = None,
    ) -> AsyncIngestStream:
        """Stream items into a collection (see `Client.ingest`); iterate with `async for`,
        or `await stream.run()` for the summary. `items` may be sync or async iterable."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        state = self._ingest_state(
            collection=collection,
            create_collection=create_collection,
            skip_existing=skip_existing,
            progress=progress,
            total=total,
            window=window,
            max_attempts=max_attempts,
            backoff=backoff,
        )
        method: Callable[..., AsyncIterator[pb.IngestAck]] = self._methods["Ingest"]

        def open_stream(requests: AsyncIterator[pb.IngestRequest]) -> AsyncIterator[pb.IngestAck]:
            return method(requests, timeout=timeout, metadata=self._metadata)

        return AsyncIngestStream(state, items, open_stream)

    async def ingest_path(
        self,
        path: str | os.PathLike[str],
        *,
        caption_field: str | None = None,
        collection: str | None = None,
        create_collection: bool = True,
        skip_existing: bool = False,
        progress: bool = True,
        window: int = 256,
        max_attempts: int = 5,
    ) -> IngestSummary:
        """Ingest a directory of images, a CSV or JSONL manifest (see `Client.ingest_path`)."""
        source = open_source(path, caption_field=caption_field)
        total = await asyncio.to_thread(lambda: source.total) if progress else None
        stream = self.ingest(
            source,
            collection=collection,
            create_collection=create_collection,
            skip_existing=skip_existing,
            progress=progress,
            total=total,
            window=window,
            max_attempts=max_attempts,
        )
        return await stream.run()

    # --- items ---------------------------------------------------------------------------

    async def get(
        self,
        ids: Sequence[str],
        *,
        include_vectors: bool = False,
        collection: str | None = None,
        timeout: float | None = None,
    ) -> list[Item]:
        """The stored items of `ids` that exist, in request order."""
        return await self._call(convert.get_rpc(ids, include_vectors, collection), timeout)

    async def delete(
        self, ids: Sequence[str], *, collection: str | None = None, timeout: float | None = None
    ) -> int:
        """Delete items; returns how many of the ids existed."""
        return await self._call(convert.delete_rpc(ids, collection), timeout)

    async def count(
        self, filter: str = "", *, collection: str | None = None, timeout: float | None = None
    ) -> int:
        """Items in the collection (matching `filter`)."""
        return await self._call(convert.count_rpc(filter, collection), timeout)

    # --- collections ---------------------------------------------------------------------

    async def create_collection(
        self, name: str, *, exist_ok: bool = False, timeout: float | None = None
    ) -> bool:
        """Create a collection; True if created, False if it existed (with `exist_ok`)."""
        return await self._call(convert.create_collection_rpc(name, exist_ok), timeout)

    async def list_collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        return await self._call(convert.list_collections_rpc(), timeout)

    async def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Drop a collection and its items (never retried automatically)."""
        await self._call(convert.drop_collection_rpc(name), timeout)

    # --- profile -------------------------------------------------------------------------

    async def profile(
        self,
        text: str | None = None,
        *,
        image: ImageInput | None = None,
        vector: np.ndarray | Sequence[float] | None = None,
        like: str | None = None,
        call: Literal["search", "encode"] = "search",
        target: Target = "image",
        top_k: int = 10,
        filter: str = "",
        collection: str | None = None,
        repeat: int = 1,
        timeout: float | None = None,
    ) -> Profile:
        """The time breakdown of a search or encode call (see `Client.profile`)."""
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        rpc = profiled_rpc(
            call=call,
            text=text,
            image=image,
            vector=vector,
            like=like,
            target=target,
            top_k=top_k,
            filter=filter,
            collection=collection,
        )
        samples = []
        for _ in range(repeat):
            started = time.perf_counter_ns()
            result = await self._call(rpc, timeout)
            round_trip_us = (time.perf_counter_ns() - started) // 1000
            samples.append(Sample(round_trip_us, result.timing))
        description = profile_description(
            call, text=text, image=image, vector=vector, like=like, target=target, top_k=top_k
        )
        return Profile(description, tuple(samples))
