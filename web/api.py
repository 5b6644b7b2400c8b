"""The JSON API the page uses (and anyone may): info, collections, search (text, image, like),
image upload search, encode, thumbnails."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from clipsearch.client import ClipsearchError, NotFound, SearchResult
from clipsearch.web.backends import Backend, Backends
from clipsearch.web.errors import invalid
from clipsearch.web.inputs import MAX_IMAGE_BYTES, decode_image, decode_images
from clipsearch.web.media import DEFAULT_THUMBNAIL_SIZE, ThumbnailCache

router = APIRouter(prefix="/api", tags=["search"])
TargetName = Literal["image", "caption", "both"]
MAX_TOP_K = 200


@dataclass
class WebState:
    backends: Backends
    thumbnails: ThumbnailCache | None


def web_state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state


# --- models ------------------------------------------------------------------------------


class ServerOut(BaseModel):
    index: int
    address: str
    model_name: str = ""
    model_id: str = ""
    model_family: str = ""
    dim: int = 0
    version: str = ""
    store: str = ""
    error: str | None = Field(
        default=None, description="why the server did not answer, if it did not"
    )


class InfoOut(BaseModel):
    servers: list[ServerOut]
    thumbnails: bool = Field(description="whether a media root is configured")


class CollectionOut(BaseModel):
    server: int
    name: str
    count: int
    dim: int
    model_id: str
    searchable: bool = Field(description="built with the model its server serves")


class CollectionsOut(BaseModel):
    collections: list[CollectionOut]
    errors: list[ServerOut] = Field(default_factory=list)


class SearchIn(BaseModel):
    """Exactly one query: `text`, `image` (a data URI or base64) or `like` (a stored id)."""

    text: str | None = None
    image: str | None = Field(default=None, description="data:image/...;base64,... or bare base64")
    like: str | None = Field(default=None, description='a stored item id: "more like this"')
    target: TargetName = "image"
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K)
    offset: int = Field(default=0, ge=0)
    filter: str = ""
    collection: str | None = None
    server: int = Field(default=0, ge=0, description="index of the server (see /api/info)")


class TimingOut(BaseModel):
    queue_us: int
    preprocess_us: int
    inference_us: int
    search_us: int
    total_us: int
    batch_size: int


class HitOut(BaseModel):
    id: str
    score: float
    uri: str
    caption: str
    metadata: dict[str, Any]
    thumbnail: str | None = Field(description="URL of the thumbnail, when under the media root")


class SearchOut(BaseModel):
    server: int
    collection: str | None
    hits: list[HitOut]
    query_truncated: bool
    timing: TimingOut
    round_trip_ms: float = Field(description="the gRPC call as the web process measured it")


class EncodeIn(BaseModel):
    texts: list[str] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="data URIs or base64")
    server: int = Field(default=0, ge=0)


class EncodeOut(BaseModel):
    model: str
    dim: int
    text_vectors: list[list[float]]
    image_vectors: list[list[float]]
    truncated: list[bool]
    timing: list[TimingOut]


# --- routes ------------------------------------------------------------------------------


@router.get("/info", summary="the servers behind this page and their models")
async def info(request: Request) -> InfoOut:
    state = web_state(request)
    servers = await asyncio.gather(*(_server_out(b) for b in state.backends.all()))
    return InfoOut(servers=list(servers), thumbnails=state.thumbnails is not None)


async def _server_out(backend: Backend) -> ServerOut:
    try:
        i = await backend.server_info()
    except ClipsearchError as exc:
        return ServerOut(index=backend.index, address=backend.address, error=str(exc))
    return ServerOut(
        index=backend.index,
        address=backend.address,
        model_name=i.model_name,
        model_id=i.model_id,
        model_family=i.model_family,
        dim=i.dim,
        version=i.version,
        store=i.store,
    )


@router.get("/collections", summary="the collections of every server")
async def collections(request: Request) -> CollectionsOut:
    out = CollectionsOut(collections=[])
    for backend in web_state(request).backends.all():
        try:
            served = await backend.server_info()
            listed = await backend.client.list_collections()
        except ClipsearchError as exc:
            failed = ServerOut(index=backend.index, address=backend.address, error=str(exc))
            out.errors.append(failed)
            continue
        out.collections += [
            CollectionOut(
                server=backend.index,
                name=c.name,
                count=c.count,
                dim=c.dim,
                model_id=c.model_id,
                searchable=c.model_id == served.model_id,
            )
            for c in listed
        ]
    return out


@router.post("/search", summary="search a collection by text, image or stored id")
async def search(body: SearchIn, request: Request) -> SearchOut:
    given = [name for name in ("text", "image", "like") if getattr(body, name) is not None]
    if len(given) != 1:
        raise invalid(f"give exactly one of text, image or like (got {', '.join(given) or 'none'})")
    image = decode_image(body.image, what="image") if body.image is not None else None
    return await _search(request, body, image)


@router.post("/search/upload", summary="search with an uploaded image file (multipart form)")
async def search_upload(
    request: Request,
    *,
    file: Annotated[UploadFile, File(description="the query image")],
    target: Annotated[TargetName, Form()] = "image",
    top_k: Annotated[int, Form(ge=1, le=MAX_TOP_K)] = 10,
    offset: Annotated[int, Form(ge=0)] = 0,
    filter: Annotated[str, Form()] = "",
    collection: Annotated[str | None, Form()] = None,
    server: Annotated[int, Form(ge=0)] = 0,
) -> SearchOut:
    data = await file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(f"the image is over {MAX_IMAGE_BYTES // 2**20} MiB")
    if not data:
        raise invalid("the uploaded file is empty")
    body = SearchIn(
        target=target,
        top_k=top_k,
        offset=offset,
        filter=filter,
        collection=collection or None,
        server=server,
    )
    return await _search(request, body, data)


async def _search(request: Request, body: SearchIn, image: bytes | None) -> SearchOut:
    state = web_state(request)
    backend = state.backends.get(body.server)
    started = time.perf_counter()
    result = await backend.client.search(
        body.text,
        image=image,  # bytes only: a str would be read as a path on this machine
        like=body.like,
        target=body.target,
        top_k=body.top_k,
        offset=body.offset,
        filter=body.filter,
        collection=body.collection or None,
    )
    round_trip_ms = (time.perf_counter() - started) * 1000
    hits = await asyncio.to_thread(_hits_out, result, state.thumbnails)
    return SearchOut(
        server=backend.index,
        collection=body.collection,
        hits=hits,
        query_truncated=result.query_truncated,
        timing=TimingOut(**result.timing.to_dict()),
        round_trip_ms=round(round_trip_ms, 3),
    )


def _hits_out(result: SearchResult, thumbnails: ThumbnailCache | None) -> list[HitOut]:
    return [
        HitOut(
            id=h.id,
            score=h.score,
            uri=h.uri,
            caption=h.caption,
            metadata=h.metadata,
            thumbnail=(
                f"/api/thumbnail?uri={quote(h.uri, safe='')}"
                if thumbnails is not None and thumbnails.media.contains(h.uri)
                else None
            ),
        )
        for h in result.hits
    ]


@router.post("/encode", summary="texts and images to embeddings")
async def encode(body: EncodeIn, request: Request) -> EncodeOut:
    if not body.texts and not body.images:
        raise invalid("give texts, images or both")
    backend = web_state(request).backends.get(body.server)
    served = await backend.server_info()
    images = decode_images(body.images)
    out = EncodeOut(
        model=served.model_name,
        dim=served.dim,
        text_vectors=[],
        image_vectors=[],
        truncated=[],
        timing=[],
    )
    if body.texts:
        texts = await backend.client.encode_texts(body.texts)
        out.text_vectors = texts.vectors.tolist()
        out.truncated = texts.truncated
        out.timing.append(TimingOut(**texts.timing.to_dict()))
    if images:
        encoded = await backend.client.encode_images(images)
        out.image_vectors = encoded.vectors.tolist()
        out.timing.append(TimingOut(**encoded.timing.to_dict()))
    return out


@router.get(
    "/thumbnail",
    summary="a resized image of a file under the media root",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}},
)
async def thumbnail(
    request: Request,
    uri: Annotated[str, Query(description="a hit's uri: a path under the media root")],
    size: Annotated[int, Query(description="64, 128, 256 or 512")] = DEFAULT_THUMBNAIL_SIZE,
) -> Response:
    cache = web_state(request).thumbnails
    if cache is None:
        raise NotFound("thumbnails are off: start clipsearch web with --media-root")
    made = await asyncio.to_thread(cache.get, uri, size)
    return Response(
        made.data,
        media_type=made.media_type,
        headers={"Cache-Control": "private, max-age=3600"},
    )
