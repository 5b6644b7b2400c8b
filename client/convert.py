"""Between the client's Python values and the wire messages, shared by `Client` and `AsyncClient`.

Each unary call is one `Rpc`: the stub method, the request message, and the function that
turns the response into the value handed back, typed end to end by the mypy-protobuf stubs
(the request must be the method's, the parser must take its response). Building and parsing
live here, once, and are unit-tested without a server; `clipsearch.client.operations` puts
them together with deadlines and error mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from clipsearch.client.errors import InvalidArgument, error_for, status_code
from clipsearch.client.types import (
    BatcherStats,
    CollectionInfo,
    EncodeResult,
    Hit,
    ImageInput,
    IngestItem,
    IngestResult,
    IngestStatus,
    Item,
    ModelInfo,
    SearchResult,
    ServerInfo,
    Target,
    Timing,
    TowerInfo,
)
from clipsearch.v1 import clipsearch_pb2 as pb

if TYPE_CHECKING:
    from clipsearch.v1.clipsearch_pb2_grpc import ClipSearchStub

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
ResultT_co = TypeVar("ResultT_co", covariant=True)

TARGETS: dict[str, pb.Target.ValueType] = {
    "image": pb.TARGET_IMAGE,
    "caption": pb.TARGET_CAPTION,
    "both": pb.TARGET_BOTH,
}
INGEST_STATUS: dict[int, IngestStatus] = {
    pb.INGEST_STATUS_OK: "ok",
    pb.INGEST_STATUS_FAILED: "failed",
    pb.INGEST_STATUS_SKIPPED: "skipped",
}


@dataclass(frozen=True)
class Rpc(Generic[RequestT, ResponseT, ResultT_co]):
    """One unary call: the stub's `method`, its request, and the parser of its response."""

    method: Callable[[ClipSearchStub], grpc.UnaryUnaryMultiCallable[RequestT, ResponseT]]
    request: RequestT
    parse: Callable[[ResponseT], ResultT_co]


# --- values ------------------------------------------------------------------------------


def vector_to_bytes(vector: np.ndarray | Sequence[float], what: str = "a query vector") -> bytes:
    """The wire form of a vector: little-endian float32."""
    try:
        array = np.asarray(vector, dtype="<f4")
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} is not a vector of numbers") from None
    if array.ndim != 1 or array.size == 0:
        raise InvalidArgument(f"{what} must be 1-D and non-empty, got shape {array.shape}")
    return array.tobytes()


def vector_from_bytes(data: bytes) -> np.ndarray:
    """A wire vector as a (writable) float32 array."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def vectors_from_bytes(rows: Sequence[bytes]) -> np.ndarray:
    """Wire vectors of equal length as one float32 [n, dim] array."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    dim = len(rows[0]) // 4
    return np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), dim).astype(np.float32)


def timing_from_pb(timing: pb.Timing) -> Timing:
    return Timing(
        queue_us=timing.queue_us,
        preprocess_us=timing.preprocess_us,
        inference_us=timing.inference_us,
        search_us=timing.search_us,
        total_us=timing.total_us,
        batch_size=timing.batch_size,
    )


def metadata_to_json(metadata: Mapping[str, Any]) -> str:
    if not metadata:
        return ""
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"metadata is not JSON-serializable: {exc}") from None


def metadata_from_json(raw: str) -> dict[str, Any]:
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {"value": value}


def read_image(image: ImageInput) -> bytes:
    """Image bytes as given, or read from a path (str or PathLike)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    raise TypeError(f"an image is bytes or a path, not {type(image).__name__}")


def target_to_pb(target: Target | str) -> pb.Target.ValueType:
    try:
        return TARGETS[target.lower()]
    except KeyError:
        raise InvalidArgument(
            f"unknown target {target!r}; choose from {', '.join(TARGETS)}"
        ) from None


# --- Info --------------------------------------------------------------------------------


def info_rpc() -> Rpc[pb.InfoRequest, pb.InfoResponse, ServerInfo]:
    return Rpc(lambda stub: stub.Info, pb.InfoRequest(), server_info)


def tower_info(tower: pb.TowerInfo) -> TowerInfo:
    return TowerInfo(tower.precision, tuple(tower.providers), tower.max_batch_size)


def batcher_stats(stats: pb.BatcherStats) -> BatcherStats:
    return BatcherStats(
        name=stats.name,
        queued_interactive=stats.queued_interactive,
        queued_bulk=stats.queued_bulk,
        batches=stats.batches,
        items=stats.items,
        mean_batch_size=stats.mean_batch_size,
        dropped_cancelled=stats.dropped_cancelled,
        dropped_expired=stats.dropped_expired,
        failed_batches=stats.failed_batches,
        rejected_overload=stats.rejected_overload,
    )


def model_info(model: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=model.name,
        family=model.family,
        source_checkpoint=model.source_checkpoint,
        model_id=model.model_id,
        dim=model.dim,
        context_length=model.context_length,
        image_size=model.image_size,
        text=tower_info(model.text),
        vision=tower_info(model.vision),
        is_default=model.is_default,
        memory_bytes=model.memory_bytes,
        startup_us=model.startup_us,
    )


def server_info(response: pb.InfoResponse) -> ServerInfo:
    return ServerInfo(
        model_name=response.model_name,
        model_family=response.model_family,
        source_checkpoint=response.source_checkpoint,
        model_id=response.model_id,
        dim=response.dim,
        context_length=response.context_length,
        image_size=response.image_size,
        text=tower_info(response.text),
        vision=tower_info(response.vision),
        version=response.version,
        versions=dict(response.versions),
        store=response.store,
        timing=timing_from_pb(response.timing),
        batchers=tuple(batcher_stats(b) for b in response.batchers),
        models=tuple(model_info(m) for m in response.models),
    )


# --- Encode ------------------------------------------------------------------------------


def encode_request(
    inputs: Sequence[str | bytes], request_id: int = 0, model: str | None = None
) -> pb.EncodeRequest:
    """An EncodeRequest: each `str` is a text, each `bytes` an encoded image; `model` names
    a served model (None: the server's default)."""
    request = pb.EncodeRequest(request_id=request_id, model=model or "")
    for value in inputs:
        if isinstance(value, str):
            request.inputs.add(text=value)
        elif isinstance(value, bytes | bytearray | memoryview):
            request.inputs.add(image=bytes(value))
        else:
            raise TypeError(f"an encode input is a str (text) or bytes (image), not {value!r}")
    return request


def encode_result(response: pb.EncodeResponse) -> EncodeResult:
    if response.error or response.error_code:
        return EncodeResult(
            vectors=np.zeros((0, 0), np.float32),
            truncated=[],
            timing=timing_from_pb(response.timing),
            request_id=response.request_id,
            error=error_for(response.error_code or grpc.StatusCode.UNKNOWN, response.error),
            model=response.model,
        )
    return EncodeResult(
        vectors=vectors_from_bytes([e.vector.data for e in response.embeddings]),
        truncated=[e.truncated for e in response.embeddings],
        timing=timing_from_pb(response.timing),
        request_id=response.request_id,
        model=response.model,
    )


def encode_rpc(
    inputs: Sequence[str | bytes], model: str | None = None
) -> Rpc[pb.EncodeRequest, pb.EncodeResponse, EncodeResult]:
    return Rpc(lambda stub: stub.Encode, encode_request(inputs, model=model), encode_result)


def texts_rpc(
    texts: Sequence[str], model: str | None = None
) -> Rpc[pb.EncodeRequest, pb.EncodeResponse, EncodeResult]:
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a sequence of texts; wrap a single text in a list")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"encode_texts takes str values, got {type(text).__name__}")
    return encode_rpc(texts, model)


def images_rpc(
    images: Sequence[ImageInput], model: str | None = None
) -> Rpc[pb.EncodeRequest, pb.EncodeResponse, EncodeResult]:
    if isinstance(images, bytes | str):
        raise TypeError("encode_images takes a sequence of images; wrap a single one in a list")
    return encode_rpc([read_image(image) for image in images], model)


# --- Search ------------------------------------------------------------------------------


def search_request(
    text: str | None = None,
    *,
    image: ImageInput | None = None,
    vector: np.ndarray | Sequence[float] | None = None,
    like: str | None = None,
    target: Target | str = "image",
    top_k: int = 10,
    offset: int = 0,
    filter: str = "",
    output_fields: Sequence[str] = (),
    params: Mapping[str, float] | None = None,
    collection: str | None = None,
) -> pb.SearchRequest:
    given = [
        name
        for name, value in (("text", text), ("image", image), ("vector", vector), ("like", like))
        if value is not None
    ]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        raise InvalidArgument(f"give exactly one query: text, image, vector or like ({found})")
    if top_k < 1:
        raise InvalidArgument(f"top_k must be at least 1, got {top_k}")
    if offset < 0:
        raise InvalidArgument(f"offset must be >= 0, got {offset}")
    request = pb.SearchRequest(
        collection=collection or "",
        target=target_to_pb(target),
        top_k=top_k,
        offset=offset,
        filter=filter,
        output_fields=list(output_fields),
        search_params=dict(params or {}),
    )
    if text is not None:
        request.text = text
    elif image is not None:
        request.image = read_image(image)
    elif vector is not None:
        request.vector.data = vector_to_bytes(vector)
    elif like is not None:
        request.like_id = like
    return request


def hit_from_pb(hit: pb.Hit) -> Hit:
    return Hit(
        id=hit.id,
        score=hit.score,
        uri=hit.uri,
        caption=hit.caption,
        metadata=metadata_from_json(hit.metadata_json),
    )


def search_result(response: pb.SearchResponse) -> SearchResult:
    return SearchResult(
        hits=[hit_from_pb(hit) for hit in response.hits],
        query_truncated=response.query_truncated,
        timing=timing_from_pb(response.timing),
        model=response.model,
    )


def search_rpc(request: pb.SearchRequest) -> Rpc[pb.SearchRequest, pb.SearchResponse, SearchResult]:
    return Rpc(lambda stub: stub.Search, request, search_result)


# --- Ingest ------------------------------------------------------------------------------


def ingest_options(
    collection: str | None,
    create_collection: bool,
    skip_existing: bool,
    model: str | None = None,
    vectors_model_id: str | None = None,
) -> pb.IngestRequest:
    return pb.IngestRequest(
        options=pb.IngestOptions(
            collection=collection or "",
            create_collection=create_collection,
            skip_existing=skip_existing,
            model=model or "",
            vectors_model_id=vectors_model_id or "",
        )
    )


def ingest_item(item: IngestItem, seq: int) -> pb.IngestItem:
    """The wire form of an item; reads the image file of path items (may raise OSError)."""
    message = pb.IngestItem(
        id=item.id,
        image=item.read_image(),
        uri=item.uri,
        caption=item.caption,
        metadata_json=metadata_to_json(item.metadata),
        seq=seq,
    )
    if item.image_vector is not None:
        message.image_vector.data = vector_to_bytes(item.image_vector, "the image vector")
    if item.caption_vector is not None:
        message.caption_vector.data = vector_to_bytes(item.caption_vector, "the caption vector")
    return message


def ingest_result(ack: pb.IngestAck) -> IngestResult:
    status = INGEST_STATUS.get(ack.status, "failed")
    failed = status == "failed"
    error = ack.error
    if failed and not error:
        error = f"the server answered status {ack.status} without a reason"
    return IngestResult(
        seq=ack.seq,
        id=ack.id,
        status=status,
        error=error,
        error_code=status_code(ack.error_code).name if failed else "",
        caption_truncated=ack.caption_truncated,
        timing=timing_from_pb(ack.timing),
    )


# --- items and collections ---------------------------------------------------------------


def _ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise TypeError("pass a sequence of ids; wrap a single id in a list")
    return list(ids)


def item_from_pb(item: pb.Item) -> Item:
    return Item(
        id=item.id,
        uri=item.uri,
        caption=item.caption,
        metadata=metadata_from_json(item.metadata_json),
        image_vector=vector_from_bytes(item.image_vector.data)
        if item.HasField("image_vector") and item.image_vector.data
        else None,
        caption_vector=vector_from_bytes(item.caption_vector.data)
        if item.HasField("caption_vector") and item.caption_vector.data
        else None,
    )


def get_rpc(
    ids: Sequence[str], include_vectors: bool, collection: str | None
) -> Rpc[pb.GetRequest, pb.GetResponse, list[Item]]:
    request = pb.GetRequest(
        collection=collection or "", ids=_ids(ids), include_vectors=include_vectors
    )
    return Rpc(
        lambda stub: stub.Get, request, lambda response: [item_from_pb(i) for i in response.items]
    )


def delete_rpc(
    ids: Sequence[str], collection: str | None
) -> Rpc[pb.DeleteRequest, pb.DeleteResponse, int]:
    request = pb.DeleteRequest(collection=collection or "", ids=_ids(ids))
    return Rpc(lambda stub: stub.Delete, request, lambda response: int(response.deleted))


def count_rpc(filter: str, collection: str | None) -> Rpc[pb.CountRequest, pb.CountResponse, int]:
    request = pb.CountRequest(collection=collection or "", filter=filter)
    return Rpc(lambda stub: stub.Count, request, lambda response: int(response.count))


def create_collection_rpc(
    name: str, exist_ok: bool, model: str | None = None
) -> Rpc[pb.CreateCollectionRequest, pb.CreateCollectionResponse, bool]:
    request = pb.CreateCollectionRequest(name=name, exist_ok=exist_ok, model=model or "")
    return Rpc(lambda stub: stub.CreateCollection, request, lambda r: bool(r.created))


def list_collections_rpc() -> Rpc[
    pb.ListCollectionsRequest, pb.ListCollectionsResponse, list[CollectionInfo]
]:
    def parse(response: pb.ListCollectionsResponse) -> list[CollectionInfo]:
        return [
            CollectionInfo(
                name=c.name, count=c.count, dim=c.dim, model_id=c.model_id, model=c.model
            )
            for c in response.collections
        ]

    return Rpc(lambda stub: stub.ListCollections, pb.ListCollectionsRequest(), parse)


def drop_collection_rpc(
    name: str,
) -> Rpc[pb.DropCollectionRequest, pb.DropCollectionResponse, None]:
    request = pb.DropCollectionRequest(name=name)
    return Rpc(lambda stub: stub.DropCollection, request, lambda _: None)
