"""Every unary operation of the client, written once as a plan (see `clipsearch.client.base`).

`Client` exposes each of these as a blocking method and `AsyncClient` as a coroutine method,
with this signature (less `client`) and this docstring. The streaming calls, `ingest` and
`encode_stream`, differ in how they iterate and live in the faces; their request building,
parsing and resume logic are shared too (`convert`, `ingest`, `EncodeRequests`).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import grpc
import numpy as np

from clipsearch.client import convert
from clipsearch.client.base import ClientBase, Drain, Plan, Sleep, blocking, ingest_state, unary
from clipsearch.client.errors import ClipsearchError, InvalidArgument, Unavailable
from clipsearch.client.ingest import Backoff
from clipsearch.client.profile import Profile, Sample
from clipsearch.client.sources import open_source
from clipsearch.client.types import (
    CollectionInfo,
    CollectionResult,
    Comparison,
    EncodeResult,
    ImageInput,
    IngestSummary,
    Item,
    SearchResult,
    ServerInfo,
    Target,
)
from clipsearch.v1 import clipsearch_pb2 as pb

# --- model -------------------------------------------------------------------------------


def info(client: ClientBase, *, timeout: float | None = None) -> Plan[ServerInfo]:
    """The served models (`.models`; the top-level fields describe the default one), their
    precision, execution providers, memory and start-up time, and versions."""
    return (yield from unary(client, convert.info_rpc(), timeout))


def wait_until_ready(client: ClientBase, timeout: float = 60.0) -> Plan[ServerInfo]:
    """Wait for the server to answer (it says UNAVAILABLE while warming up); raises
    Unavailable if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        attempt_s = max(0.1, min(5.0, deadline - time.monotonic()))
        try:
            return (yield from unary(client, convert.info_rpc(), attempt_s))
        except ClipsearchError as exc:
            if not exc.retryable and exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            if time.monotonic() + delay > deadline:
                raise Unavailable(
                    f"the server at {client.address} was not ready within {timeout:g} s: "
                    f"{exc.message}"
                ) from None
        yield Sleep(delay)
        delay = min(delay * 2, 1.0)


def encode_texts(
    client: ClientBase,
    texts: Sequence[str],
    *,
    model: str | None = None,
    timeout: float | None = None,
) -> Plan[EncodeResult]:
    """Texts to embeddings, [len(texts), dim] float32, in input order, with the served
    model called `model` (default: the server's default model)."""
    return (yield from unary(client, convert.texts_rpc(texts, model), timeout))


def encode_images(
    client: ClientBase,
    images: Sequence[ImageInput],
    *,
    model: str | None = None,
    timeout: float | None = None,
) -> Plan[EncodeResult]:
    """Images (encoded bytes, or paths of image files) to embeddings, in input order, with
    the served model called `model` (default: the server's default model)."""
    rpc = yield from blocking(lambda: convert.images_rpc(images, model))  # may read files
    return (yield from unary(client, rpc, timeout))


class EncodeRequests:
    """The requests of an encode stream, numbered from 0. An error raised by the caller's
    batches ends the requests quietly and is raised by `check()` after the stream."""

    def __init__(
        self,
        batches: Iterable[Sequence[str | bytes]] | AsyncIterable[Any],
        model: str | None = None,
    ) -> None:
        self._batches = batches
        self._model = model
        self._failure: Exception | None = None

    def __iter__(self) -> Iterator[pb.EncodeRequest]:
        try:
            if isinstance(self._batches, AsyncIterable):
                raise TypeError("batches from an async iterable need the AsyncClient")
            for request_id, batch in enumerate(self._batches):
                yield convert.encode_request(batch, request_id, self._model)
        except Exception as exc:
            self._failure = exc

    async def __aiter__(self) -> AsyncIterator[pb.EncodeRequest]:
        if not isinstance(self._batches, AsyncIterable):
            for request in self:
                yield request
            return
        try:
            request_id = 0
            async for batch in self._batches:
                yield convert.encode_request(batch, request_id, self._model)
                request_id += 1
        except Exception as exc:
            self._failure = exc

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure


# --- search ------------------------------------------------------------------------------


def search(
    client: ClientBase,
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
) -> Plan[SearchResult]:
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
    return (yield from unary(client, convert.search_rpc(request), timeout))


def compare(
    client: ClientBase,
    text: str | None = None,
    *,
    image: ImageInput | None = None,
    collections: Sequence[str],
    target: Target = "image",
    top_k: int = 10,
    filter: str = "",
    timeout: float | None = None,
) -> Plan[Comparison]:
    """The same query (a text, or an image: bytes or path) against each of `collections`,
    one after another, typically collections built with different models: the server
    encodes the query with each collection's model. Returns each collection's hits, the
    model that searched it, the server's timing and the client's round trip."""
    if isinstance(collections, str):
        raise TypeError("collections is a sequence of names; wrap a single one in a list")
    names = list(collections)
    if not names:
        raise InvalidArgument("compare needs at least one collection")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"a collection is named twice: {names}")
    if (text is None) == (image is None):
        raise InvalidArgument("give exactly one query: a text or an image")
    data = None if image is None else (yield from blocking(lambda: convert.read_image(image)))
    results = []
    for name in names:
        request = convert.search_request(
            text, image=data, target=target, top_k=top_k, filter=filter, collection=name
        )
        started = time.perf_counter_ns()
        result = yield from unary(client, convert.search_rpc(request), timeout)
        results.append(CollectionResult(name, result, (time.perf_counter_ns() - started) // 1000))
    return Comparison(describe_query(text, image, None, None), target, top_k, results)


# --- ingest ------------------------------------------------------------------------------


def ingest_path(
    client: ClientBase,
    path: str | os.PathLike[str],
    *,
    caption_field: str | None = None,
    collection: str | None = None,
    create_collection: bool = True,
    skip_existing: bool = False,
    model: str | None = None,
    vectors_model_id: str | None = None,
    progress: bool = True,
    window: int = 256,
    max_attempts: int | None = None,
    backoff: Backoff | None = None,
) -> Plan[IngestSummary]:
    """Ingest a directory of images, a CSV, JSONL or Parquet manifest, or one image file.

    See `clipsearch.client.sources` for the manifest columns; `caption_field` names the
    caption column (default "caption"). `model`: the served model of a collection created
    here (default: the server's default); an existing collection must have been built with
    it. Parquet rows may carry vectors computed elsewhere (`clipsearch.client.parquet`), by
    the model `vectors_model_id` names (default: the one the file's schema metadata records).
    Returns the counts and each failure's reason. A broken stream is resumed as
    `Client.ingest` does (`backoff`, `max_attempts`).
    """
    source = open_source(path, caption_field=caption_field)
    total = (yield from blocking(lambda: source.total)) if progress else None
    if vectors_model_id is None:
        vectors_model_id = yield from blocking(lambda: source.model_id)
    state = ingest_state(
        source,
        collection=collection,
        create_collection=create_collection,
        skip_existing=skip_existing,
        model=model,
        vectors_model_id=vectors_model_id,
        progress=progress,
        total=total,
        window=window,
        max_attempts=max_attempts,
        backoff=backoff,
    )
    summary: IngestSummary = yield Drain(state, source, timeout=None)
    return summary


# --- items -------------------------------------------------------------------------------


def get(
    client: ClientBase,
    ids: Sequence[str],
    *,
    include_vectors: bool = False,
    collection: str | None = None,
    timeout: float | None = None,
) -> Plan[list[Item]]:
    """The stored items of `ids` that exist, in request order (missing ids are left out)."""
    return (yield from unary(client, convert.get_rpc(ids, include_vectors, collection), timeout))


def delete(
    client: ClientBase,
    ids: Sequence[str],
    *,
    collection: str | None = None,
    timeout: float | None = None,
) -> Plan[int]:
    """Delete items; returns how many of the ids existed."""
    return (yield from unary(client, convert.delete_rpc(ids, collection), timeout))


def count(
    client: ClientBase,
    filter: str = "",
    *,
    collection: str | None = None,
    timeout: float | None = None,
) -> Plan[int]:
    """Items in the collection (matching `filter`, a Milvus boolean expression)."""
    return (yield from unary(client, convert.count_rpc(filter, collection), timeout))


# --- collections -------------------------------------------------------------------------


def create_collection(
    client: ClientBase,
    name: str,
    *,
    exist_ok: bool = False,
    model: str | None = None,
    timeout: float | None = None,
) -> Plan[bool]:
    """Create a collection for the served model called `model` (default: the server's
    default model); True if created, False if it existed (with `exist_ok`; else
    AlreadyExists is raised; FailedPrecondition if it was built with another model)."""
    rpc = convert.create_collection_rpc(name, exist_ok, model)
    return (yield from unary(client, rpc, timeout))


def list_collections(
    client: ClientBase, *, timeout: float | None = None
) -> Plan[list[CollectionInfo]]:
    """The collections: name, item count, vector size and the model that filled them."""
    return (yield from unary(client, convert.list_collections_rpc(), timeout))


def drop_collection(client: ClientBase, name: str, *, timeout: float | None = None) -> Plan[None]:
    """Drop a collection and its items (never retried automatically)."""
    yield from unary(client, convert.drop_collection_rpc(name), timeout)


# --- profile -----------------------------------------------------------------------------


def profile(
    client: ClientBase,
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
    model: str | None = None,
    repeat: int = 1,
    timeout: float | None = None,
) -> Plan[Profile]:
    """Run a search (or, with call="encode", an encode with the served model called
    `model`) `repeat` times and break its time down: client round trip vs server total vs
    queue / preprocess / inference / search. `print(profile)` shows the tree."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if model is not None and call != "encode":
        raise InvalidArgument("a search uses its collection's model; `model` is for encodes")
    query = describe_query(text, image, vector, like)
    rpc: convert.Rpc[Any, Any, SearchResult | EncodeResult]
    if call == "encode":
        if text is not None and image is None:
            rpc = convert.texts_rpc([text], model)
        elif image is not None and text is None:
            rpc = convert.images_rpc([image], model)
        else:
            raise InvalidArgument("profiling an encode needs exactly one of text or image")
        description = f"Encode {query}"
    elif call == "search":
        request = convert.search_request(
            text,
            image=image,
            vector=vector,
            like=like,
            target=target,
            top_k=top_k,
            filter=filter,
            collection=collection,
        )
        rpc = convert.search_rpc(request)  # built once: an image file is read once
        description = f"Search {query} -> {target}, top_k={top_k}"
    else:
        raise ValueError(f"call must be 'search' or 'encode', got {call!r}")
    return Profile(description, (yield from timed(client, rpc, repeat, timeout)))


def timed(
    client: ClientBase,
    rpc: convert.Rpc[Any, Any, SearchResult | EncodeResult],
    repeat: int,
    timeout: float | None,
) -> Plan[tuple[Sample, ...]]:
    """`repeat` calls of `rpc`: each one's round trip and the server's timing."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        result = yield from unary(client, rpc, timeout)
        samples.append(Sample((time.perf_counter_ns() - started) // 1000, result.timing))
    return tuple(samples)


def describe_query(
    text: str | None, image: ImageInput | None, vector: Any, like: str | None
) -> str:
    """The query of a profiled call in a few words, for the report's header."""
    if text is not None:
        return f"text {text!r}"
    if isinstance(image, bytes):
        return f"image ({len(image)} bytes)"
    if image is not None:
        return f"image {str(image)!r}"
    if vector is not None:
        return "vector"
    return f"like {like!r}"
