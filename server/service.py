"""The ClipSearch gRPC service: protos in, domain calls, protos out.

The only module of the serving path that reads or builds protobuf messages. Handlers stay
thin: validation and the work itself live in search.py, ingest.py, the pipeline and the
store; errors are raised as domain errors and become status codes through the one mapping
in `interceptors` (the ErrorInterceptor for a failed call; `status_of` for the per-item and
per-request errors that streams carry in their messages). Until the models are warm every
call answers UNAVAILABLE.

A server may serve several models, each with its own pipeline (tokenizer, preprocessor,
batchers, backend): Encode uses the model its request names (the default when it names
none); Search and Ingest use the model the collection was built with (`catalog`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from grpc import aio

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.batcher import MicroBatcher, Priority
from clipsearch.server.catalog import Catalog, ModelRef
from clipsearch.server.errors import InvalidInput, ModelMismatch, NotFound, Unavailable
from clipsearch.server.ingest import (
    CollectionWriters,
    IngestItem,
    IngestOptions,
    IngestSession,
    IngestStatus,
    ItemOutcome,
)
from clipsearch.server.interceptors import STATUS_OF, status_of
from clipsearch.server.pipeline import Encoded, EncodingPipeline, StageTiming
from clipsearch.server.search import Searcher, SearchQuery, SearchTarget
from clipsearch.server.settings import Settings
from clipsearch.server.store import StoredItem
from clipsearch.server.telemetry import Observation
from clipsearch.server.vectors import from_bytes, to_bytes
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

Context = aio.ServicerContext[Any, Any]


class _Timed(Protocol):
    @property
    def timing(self) -> pb.Timing: ...


R = TypeVar("R", bound=_Timed)

ENCODE_STREAM_WINDOW = 32
TARGETS = {
    pb.TARGET_UNSPECIFIED: SearchTarget.IMAGE,
    pb.TARGET_IMAGE: SearchTarget.IMAGE,
    pb.TARGET_CAPTION: SearchTarget.CAPTION,
    pb.TARGET_BOTH: SearchTarget.BOTH,
}


@dataclass(frozen=True)
class ServedModel:
    """One model of a warm server: its encoding pipeline and its searcher."""

    ref: ModelRef
    pipeline: EncodingPipeline
    searcher: Searcher

    @property
    def name(self) -> str:
        return self.ref.name


@dataclass
class Runtime:
    """Everything a warm server needs to answer calls."""

    settings: Settings
    models: dict[str, ServedModel]  # by name, the default first
    store: AsyncStore
    catalog: Catalog
    writers: CollectionWriters
    info: pb.InfoResponse

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    @property
    def pipeline(self) -> EncodingPipeline:
        """The default model's pipeline."""
        return self.default.pipeline

    @property
    def searcher(self) -> Searcher:
        """The default model's searcher."""
        return self.default.searcher

    @property
    def dim(self) -> int:
        return self.default.pipeline.dim

    def model(self, name: str) -> ServedModel:
        """The served model called `name`; the default for ""; NotFound otherwise."""
        if not name:
            return self.default
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"no model {name!r} is served here; served: {', '.join(self.models)}")
        return model

    def served(self, ref: ModelRef) -> ServedModel:
        return self.models[ref.name]

    def vectors_model(self, model_id: str) -> ModelRef | None:
        """The served model with this model id, if any (what a collection created for
        vectors computed elsewhere is built with)."""
        for model in self.models.values():
            if model_id and model.ref.model_id == model_id:
                return model.ref
        return None


def deadline_of(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


INGEST_STATUS = {
    IngestStatus.OK: pb.INGEST_STATUS_OK,
    IngestStatus.FAILED: pb.INGEST_STATUS_FAILED,
    IngestStatus.SKIPPED: pb.INGEST_STATUS_SKIPPED,
}
INGEST_OUTCOME = {
    pb.INGEST_STATUS_OK: "ok",
    pb.INGEST_STATUS_FAILED: "failed",
    pb.INGEST_STATUS_SKIPPED: "skipped",
}
# RPCs whose store time is a write (the rest read: search, query, get, count, list).
WRITE_RPCS = frozenset({"Ingest", "Delete", "CreateCollection", "DropCollection"})


def observations(rpc: str, message: Any) -> list[Observation]:
    """The stage times a reply, or each ack of an ingest response, reports in its Timing, for
    metrics and traces (`telemetry.Reader`); none for a message without one (health,
    reflection)."""
    if isinstance(message, pb.IngestResponse):
        return [
            observation(rpc, ack.timing, INGEST_OUTCOME.get(ack.status)) for ack in message.acks
        ]
    timing = getattr(message, "timing", None)
    return [observation(rpc, timing)] if isinstance(timing, pb.Timing) else []


def observation(rpc: str, timing: pb.Timing, ingest_outcome: str | None = None) -> Observation:
    return Observation(
        queue_us=timing.queue_us,
        preprocess_us=timing.preprocess_us,
        inference_us=timing.inference_us,
        store_us=timing.search_us,
        total_us=timing.total_us,
        batch_size=timing.batch_size,
        store_stage="store_write" if rpc in WRITE_RPCS else "search",
        ingest_outcome=ingest_outcome,
    )


def batcher_stats(name: str, batcher: MicroBatcher[Any, Any]) -> pb.BatcherStats:
    stats = batcher.stats
    return pb.BatcherStats(
        name=name,
        queued_interactive=batcher.queued_at(Priority.INTERACTIVE),
        queued_bulk=batcher.queued_at(Priority.BULK),
        batches=stats.batches,
        items=stats.items,
        mean_batch_size=stats.items / stats.batches if stats.batches else 0.0,
        dropped_cancelled=stats.dropped_cancelled,
        dropped_expired=stats.dropped_expired,
        failed_batches=stats.failed_batches,
        rejected_overload=stats.rejected_overload,
    )


def with_timing(
    response: R, started: float, stage: StageTiming | None = None, store_us: int = 0
) -> R:
    """`response` with its Timing filled in: the stages, and total since `started`.
    The store's time goes in `search_us` ("vector store: search, query or write")."""
    stage = stage or StageTiming()
    response.timing.CopyFrom(
        pb.Timing(
            queue_us=stage.queue_us,
            preprocess_us=stage.preprocess_us,
            inference_us=stage.inference_us,
            search_us=store_us,
            total_us=int((time.perf_counter() - started) * 1e6),
            batch_size=stage.batch_size,
        )
    )
    return response


def metadata_json(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":")) if metadata else ""


def request_items(request: pb.IngestRequest) -> Sequence[pb.IngestItem]:
    if request.HasField("options") or not request.items:
        raise InvalidInput("after the first IngestOptions, send only items")
    return request.items


def ingest_item(item: pb.IngestItem) -> IngestItem:
    return IngestItem(
        seq=item.seq,
        image=item.image,
        id=item.id,
        uri=item.uri,
        caption=item.caption,
        metadata_json=item.metadata_json,
        image_vector=item.image_vector.data,
        caption_vector=item.caption_vector.data,
    )


def refuse_other_vectors(options: IngestOptions, model: ModelRef) -> None:
    """ModelMismatch if the stream's items carry vectors of another model than `model`."""
    if options.vectors_model_id and options.vectors_model_id != model.model_id:
        raise ModelMismatch(
            f"the items' vectors were computed with model_id {options.vectors_model_id}; "
            f"collection {options.collection!r} is for model {model}: ingest them into a "
            "collection of their model, or re-encode them"
        )


def ingest_ack(outcome: ItemOutcome) -> pb.IngestAck:
    t = outcome.timing
    return pb.IngestAck(
        seq=outcome.seq,
        id=outcome.id,
        status=INGEST_STATUS[outcome.status],
        error=outcome.error,
        error_code=0 if outcome.error_code is None else STATUS_OF[outcome.error_code].value[0],
        caption_truncated=outcome.caption_truncated,
        timing=pb.Timing(
            queue_us=t.queue_us,
            preprocess_us=t.preprocess_us,
            inference_us=t.inference_us,
            search_us=t.store_us,
            total_us=t.total_us,
            batch_size=t.batch_size,
        ),
    )


def item_message(item: StoredItem) -> pb.Item:
    message = pb.Item(
        id=item.id, uri=item.uri, caption=item.caption, metadata_json=metadata_json(item.metadata)
    )
    if item.image_vector is not None:
        message.image_vector.data = to_bytes(item.image_vector)
    if item.caption_vector is not None:
        message.caption_vector.data = to_bytes(item.caption_vector)
    return message


class ClipSearchService(pb_grpc.ClipSearchServicer):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None

    def _ready(self) -> Runtime:
        if self.runtime is None:
            raise Unavailable("the server is starting: the model is warming up; retry shortly")
        return self.runtime

    def _collection(self, name: str) -> str:
        return name or self.settings.default_collection

    # --- model ---------------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context: Context) -> pb.InfoResponse:
        started = time.perf_counter()
        rt = self._ready()
        response = pb.InfoResponse()
        response.CopyFrom(rt.info)
        response.batchers.extend(
            batcher_stats(name, batcher) for name, batcher in rt.pipeline.batchers.items()
        )
        return with_timing(response, started)

    async def Encode(self, request: pb.EncodeRequest, context: Context) -> pb.EncodeResponse:
        return await self._encode(self._ready(), request, deadline_of(context))

    async def _encode(
        self, rt: Runtime, request: pb.EncodeRequest, deadline: float | None
    ) -> pb.EncodeResponse:
        started = time.perf_counter()
        model = rt.model(request.model)
        if not request.inputs:
            raise InvalidInput("no inputs: send texts and/or images")
        limit = self.settings.inputs_per_request
        if len(request.inputs) > limit:
            raise InvalidInput(
                f"{len(request.inputs)} inputs in one request, at most {limit} allowed "
                "(setting max_inputs_per_request): split them over several requests"
            )
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, bytes]] = []
        for index, item in enumerate(request.inputs):
            kind = item.WhichOneof("input")
            if kind == "text":
                texts.append((index, item.text))
            elif kind == "image":
                if not item.image:
                    raise InvalidInput(f"input {index}: the image is empty (0 bytes)")
                images.append((index, item.image))
            else:
                raise InvalidInput(f"input {index} has neither text nor image")
        rt.pipeline.check_texts([t for _, t in texts], [f"input {i}" for i, _ in texts])
        groups: list[tuple[list[int], Awaitable[Encoded]]] = []
        if texts:
            groups.append(
                (
                    [i for i, _ in texts],
                    model.pipeline.encode_texts([t for _, t in texts], deadline=deadline),
                )
            )
        if images:
            groups.append(
                (
                    [i for i, _ in images],
                    model.pipeline.encode_images([b for _, b in images], deadline=deadline),
                )
            )
        results = await asyncio.gather(*(job for _, job in groups))
        response = pb.EncodeResponse(request_id=request.request_id, model=model.name)
        embeddings: list[pb.Embedding | None] = [None] * len(request.inputs)
        stage = StageTiming()
        for (positions, _), encoded in zip(groups, results, strict=True):
            stage = stage.combine(encoded.timing)
            for position, vector, truncated in zip(
                positions, encoded.vectors, encoded.truncated, strict=True
            ):
                embeddings[position] = pb.Embedding(
                    vector=pb.Vector(data=to_bytes(vector)), truncated=truncated
                )
        response.embeddings.extend(e for e in embeddings if e is not None)
        return with_timing(response, started, stage)

    async def EncodeStream(
        self, request_iterator: AsyncIterator[pb.EncodeRequest], context: Context
    ) -> AsyncIterator[pb.EncodeResponse]:
        rt = self._ready()
        deadline = deadline_of(context)
        # Answers in request order; None ends the stream, an exception (a broken or
        # undecodable request stream) ends it with that error after the answers before it.
        pending: asyncio.Queue[asyncio.Task[pb.EncodeResponse] | Exception | None] = asyncio.Queue(
            ENCODE_STREAM_WINDOW
        )

        async def answer(request: pb.EncodeRequest) -> pb.EncodeResponse:
            try:
                return await self._encode(rt, request, deadline)
            except Exception as exc:  # one failed request must not end the stream
                code, message = status_of(exc)
                return pb.EncodeResponse(
                    request_id=request.request_id, error=message, error_code=code.value[0]
                )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.create_task(answer(request)))
            except Exception as exc:
                await pending.put(exc)
                return
            await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                if isinstance(task, Exception):
                    raise task
                yield await task
            await reader
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()

    # --- search --------------------------------------------------------------------------

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        started = time.perf_counter()
        _, collection, model, catalog_us = await self._open(request.collection)
        kind = request.WhichOneof("query")
        query = SearchQuery(
            collection=collection,
            text=request.text if kind == "text" else None,
            image=request.image if kind == "image" else None,
            vector=from_bytes(request.vector.data, model.pipeline.dim, "query vector")
            if kind == "vector"
            else None,
            like_id=request.like_id if kind == "like_id" else None,
            target=TARGETS.get(request.target, SearchTarget.IMAGE),
            top_k=request.top_k or 10,
            offset=request.offset,
            filter=request.filter,
            output_fields=tuple(request.output_fields),
            params=dict(request.search_params),
        )
        if request.target not in TARGETS:
            raise InvalidInput(f"unknown target {request.target}")
        outcome = await model.searcher.search(query, deadline_of(context))
        response = pb.SearchResponse(query_truncated=outcome.query_truncated, model=model.name)
        for hit in outcome.hits:
            response.hits.add(
                id=hit.id,
                score=hit.score,
                uri=hit.uri,
                caption=hit.caption,
                metadata_json=metadata_json(hit.metadata),
            )
        return with_timing(response, started, outcome.encoding, outcome.store_us + catalog_us)

    # --- ingest --------------------------------------------------------------------------

    async def Ingest(
        self, request_iterator: AsyncIterator[pb.IngestRequest], context: Context
    ) -> AsyncIterator[pb.IngestResponse]:
        rt = self._ready()
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not first.HasField("options") or first.items:
            raise InvalidInput("the first Ingest message must carry IngestOptions and no items")
        options = IngestOptions(
            collection=self._collection(first.options.collection),
            skip_existing=first.options.skip_existing,
            vectors_model_id=first.options.vectors_model_id,
        )
        asked = rt.model(first.options.model).ref if first.options.model else None
        try:
            ref, _ = await rt.catalog.guarded(options.collection, asked)
        except NotFound:
            if not first.options.create_collection:
                raise
            model = asked or rt.vectors_model(options.vectors_model_id) or rt.default.ref
            refuse_other_vectors(options, model)  # before creating a collection for nothing
            await rt.catalog.create(options.collection, True, model)
            ref, _ = await rt.catalog.guarded(options.collection, asked)
        refuse_other_vectors(options, ref)
        session = IngestSession(
            rt.served(ref).pipeline, rt.store, rt.writers, options, rt.settings.ingest_window
        )
        items = (
            ingest_item(item)
            async for request in request_iterator
            for item in request_items(request)
        )
        async for outcomes in session.run(items):
            yield pb.IngestResponse(acks=[ingest_ack(outcome) for outcome in outcomes])

    # --- items ---------------------------------------------------------------------------

    async def _open(
        self, name: str, ids: Sequence[str] | None = None
    ) -> tuple[Runtime, str, ServedModel, int]:
        """The runtime, the collection, the served model it was built with, and store µs."""
        rt = self._ready()
        collection = self._collection(name)
        if ids is not None and not ids:
            raise InvalidInput("no ids given")
        ref, store_us = await rt.catalog.guarded(collection)
        return rt, collection, rt.served(ref), store_us

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        started = time.perf_counter()
        rt, collection, _, check_us = await self._open(request.collection, request.ids)
        items, get_us = await rt.store.get(collection, list(request.ids), request.include_vectors)
        found = {item.id for item in items}
        response = pb.GetResponse(
            items=[item_message(item) for item in items],
            missing_ids=[i for i in dict.fromkeys(request.ids) if i not in found],
        )
        return with_timing(response, started, store_us=check_us + get_us)

    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        started = time.perf_counter()
        rt, collection, _, check_us = await self._open(request.collection, request.ids)
        deleted, delete_us = await rt.store.delete(collection, list(request.ids))
        response = pb.DeleteResponse(deleted=deleted)
        return with_timing(response, started, store_us=check_us + delete_us)

    async def Count(self, request: pb.CountRequest, context: Context) -> pb.CountResponse:
        started = time.perf_counter()
        rt, collection, _, check_us = await self._open(request.collection)
        count, count_us = await rt.store.count(collection, request.filter)
        return with_timing(pb.CountResponse(count=count), started, store_us=check_us + count_us)

    # --- collections ---------------------------------------------------------------------

    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: Context
    ) -> pb.CreateCollectionResponse:
        started = time.perf_counter()
        rt = self._ready()
        created, store_us = await rt.catalog.create(
            _named(request.name), request.exist_ok, rt.model(request.model).ref
        )
        return with_timing(pb.CreateCollectionResponse(created=created), started, store_us=store_us)

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: Context
    ) -> pb.ListCollectionsResponse:
        started = time.perf_counter()
        rt = self._ready()
        infos, store_us = await rt.store.list_collections()
        response = pb.ListCollectionsResponse()
        for i in infos:
            served = rt.catalog.served(i)
            response.collections.add(
                name=i.name,
                count=i.count,
                dim=i.dim,
                model_id=i.model_id,
                model=served.name if served is not None else "",
            )
        return with_timing(response, started, store_us=store_us)

    async def DropCollection(
        self, request: pb.DropCollectionRequest, context: Context
    ) -> pb.DropCollectionResponse:
        started = time.perf_counter()
        rt = self._ready()
        store_us = await rt.catalog.drop(_named(request.name))
        await rt.writers.discard(request.name)
        return with_timing(pb.DropCollectionResponse(), started, store_us=store_us)


def _named(name: str) -> str:
    if not name:
        raise InvalidInput("a collection name is required")
    return name
