"""The blocking client.

    from clipsearch.client import Client

    with Client("127.0.0.1:50051") as client:
        client.ingest_path("gallery/manifest.csv", caption_field="caption_en")
        for hit in client.search("a red circle", top_k=5).hits:
            print(hit.score, hit.id, hit.caption)

Every call has a deadline (the client's `timeout`, or the call's own `timeout=`), idempotent
calls are retried by gRPC on UNAVAILABLE / RESOURCE_EXHAUSTED with backoff (see
`clipsearch.client.channel`), and every failure is a typed `ClipsearchError`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import numpy as np

from clipsearch.client import convert
from clipsearch.client.base import ClientBase, profile_description, profiled_rpc
from clipsearch.client.channel import TlsConfig, bind_methods
from clipsearch.client.errors import ClipsearchError, Unavailable, from_rpc_error
from clipsearch.client.ingest import Backoff, SyncIngestStream
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


class Client(ClientBase):
    """A blocking clipsearch client; use it as a context manager or call `close()`.

    Args:
        address: "host:port" of the server.
        timeout: default deadline of every unary call, seconds (per-call `timeout=` wins).
        token: sent as `authorization: Bearer TOKEN` with every call.
        tls: TLS (or mutual TLS) settings; None = plaintext.
        max_message_mb: largest message sent or received.
        retry: let gRPC retry idempotent calls on UNAVAILABLE / RESOURCE_EXHAUSTED.
        options: extra gRPC channel options; they override the client's own.
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
        self._channel = self.channel_config.sync_channel()
        self._methods = bind_methods(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, rpc: convert.Rpc[Any, T], timeout: float | None) -> T:
        try:
            response = self._methods[rpc.method](
                rpc.request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return rpc.parse(response)

    # --- model ---------------------------------------------------------------------------

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served model, its precision and execution providers, and versions."""
        return self._call(convert.info_rpc(), timeout)

    def wait_until_ready(self, timeout: float = 60.0) -> ServerInfo:
        """Wait for the server to answer (it says UNAVAILABLE while warming up); raises
        Unavailable if it does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return self.info(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except ClipsearchError as exc:
                if not exc.retryable and exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"the server at {self.address} was not ready within {timeout:g} s: "
                        f"{exc.message}"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def encode_texts(self, texts: Sequence[str], *, timeout: float | None = None) -> EncodeResult:
        """Texts to embeddings, [len(texts), dim] float32, in input order."""
        return self._call(convert.texts_rpc(texts), timeout)

    def encode_images(
        self, images: Sequence[ImageInput], *, timeout: float | None = None
    ) -> EncodeResult:
        """Images (encoded bytes, or paths of image files) to embeddings, in input order."""
        return self._call(convert.images_rpc(images), timeout)

    def encode_stream(
        self, batches: Iterable[Sequence[str | bytes]], *, timeout: float | None = None
    ) -> Iterator[EncodeResult]:
        """Many encode requests over one stream; results in request order.

        Each batch is a list of texts (`str`) and images (`bytes`). A batch that fails (e.g.
        a corrupt image) yields a result with `.error` set and the stream goes on. `timeout`
        bounds the whole stream (default: no deadline).
        """
        failure: list[BaseException] = []

        def requests() -> Iterator[pb.EncodeRequest]:
            try:
                for request_id, batch in enumerate(batches):
                    yield convert.encode_request(batch, request_id)
            except Exception as exc:  # surfaced to the caller after the stream ends
                failure.append(exc)

        call = self._methods["EncodeStream"](requests(), timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield convert.encode_result(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    # --- search --------------------------------------------------------------------------

    def search(
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
        """Nearest neighbours of exactly one query: a text, an image (bytes or path), a
        vector, or the id of a stored item (`like`, "more like this", which excludes it).

        `target`: "image" (image vectors), "caption" (caption vectors) or "both" (fused by
        reciprocal rank fusion). `offset` pages; `filter` is a Milvus boolean expression,
        e.g. `metadata["colour"] == "red"`; `params` are index search params (ef, nprobe).
        """
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
        return self._call(convert.search_rpc(request), timeout)

    # --- ingest --------------------------------------------------------------------------

    def ingest(
        self,
        items: Iterable[IngestItem],
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
    ) -> SyncIngestStream:
        """Stream items into a collection; yields one `IngestResult` per item as the server
        finishes it (completion order; `seq` counts items from 0 in source order).

        At most `window` items are in flight. If the stream breaks (UNAVAILABLE), the client
        reconnects with exponential backoff and resends the unacknowledged items; the server
        upserts by id, so nothing is duplicated. It gives up after `max_attempts` attempts
        in a row without an acknowledgement. `progress` shows a tqdm bar (of `total` items,
        or `len(items)` when it has one). `timeout` bounds each stream (default: none).
        Iterate the returned stream, or call its `run()` for the `IngestSummary`.
        """
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
        method: Callable[..., Iterator[pb.IngestAck]] = self._methods["Ingest"]

        def open_stream(requests: Iterator[pb.IngestRequest]) -> Iterator[pb.IngestAck]:
            return method(requests, timeout=timeout, metadata=self._metadata)

        return SyncIngestStream(state, items, open_stream)

    def ingest_path(
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
        """Ingest a directory of images, a CSV or JSONL manifest, or one image file.

        See `clipsearch.client.sources` for the manifest columns; `caption_field` names the
        caption column (default "caption"). Returns the counts and each failure's reason.
        """
        source = open_source(path, caption_field=caption_field)
        stream = self.ingest(
            source,
            collection=collection,
            create_collection=create_collection,
            skip_existing=skip_existing,
            progress=progress,
            total=source.total if progress else None,
            window=window,
            max_attempts=max_attempts,
        )
        return stream.run()

    # --- items ---------------------------------------------------------------------------

    def get(
        self,
        ids: Sequence[str],
        *,
        include_vectors: bool = False,
        collection: str | None = None,
        timeout: float | None = None,
    ) -> list[Item]:
        """The stored items of `ids` that exist, in request order (missing ids are left out)."""
        return self._call(convert.get_rpc(ids, include_vectors, collection), timeout)

    def delete(
        self, ids: Sequence[str], *, collection: str | None = None, timeout: float | None = None
    ) -> int:
        """Delete items; returns how many of the ids existed."""
        return self._call(convert.delete_rpc(ids, collection), timeout)

    def count(
        self, filter: str = "", *, collection: str | None = None, timeout: float | None = None
    ) -> int:
        """Items in the collection (matching `filter`, a Milvus boolean expression)."""
        return self._call(convert.count_rpc(filter, collection), timeout)

    # --- collections ---------------------------------------------------------------------

    def create_collection(
        self, name: str, *, exist_ok: bool = False, timeout: float | None = None
    ) -> bool:
        """Create a collection for the served model; True if created, False if it existed
        (with `exist_ok`; else AlreadyExists is raised)."""
        return self._call(convert.create_collection_rpc(name, exist_ok), timeout)

    def list_collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        return self._call(convert.list_collections_rpc(), timeout)

    def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Drop a collection and its items (never retried automatically)."""
        self._call(convert.drop_collection_rpc(name), timeout)

    # --- profile -------------------------------------------------------------------------

    def profile(
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
        """Run a search (or, with call="encode", an encode) `repeat` times and break its
        time down: client round trip vs server total vs queue / preprocess / inference /
        search. `print(profile)` shows the tree."""
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
            result = self._call(rpc, timeout)
            round_trip_us = (time.perf_counter_ns() - started) // 1000
            samples.append(Sample(round_trip_us, result.timing))
        description = profile_description(
            call, text=text, image=image, vector=vector, like=like, target=target, top_k=top_k
        )
        return Profile(description, tuple(samples))
