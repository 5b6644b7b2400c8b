"""The values the client hands back: plain dataclasses, no protobuf in sight."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipsearch.client.errors import ClipsearchError

Target = Literal["image", "caption", "both"]
IngestStatus = Literal["ok", "failed", "skipped"]
ImageInput = bytes | str | os.PathLike[str]
"""An image for encode/search: its encoded bytes, or the path of an image file."""
TIMING_STAGES = ("queue", "preprocess", "inference", "search")
"""The server's stages in `Timing`, in the order a call passes them (`<stage>_us` fields)."""


@dataclass(frozen=True)
class Timing:
    """Where the server spent the time of one call, in microseconds."""

    queue_us: int = 0
    preprocess_us: int = 0
    inference_us: int = 0
    search_us: int = 0
    total_us: int = 0
    batch_size: int = 0

    @property
    def queue_ms(self) -> float:
        return self.queue_us / 1000

    @property
    def preprocess_ms(self) -> float:
        return self.preprocess_us / 1000

    @property
    def inference_ms(self) -> float:
        return self.inference_us / 1000

    @property
    def search_ms(self) -> float:
        return self.search_us / 1000

    @property
    def total_ms(self) -> float:
        return self.total_us / 1000

    def stage_us(self, stage: str) -> int:
        """The microseconds of one of `TIMING_STAGES`."""
        value: int = getattr(self, f"{stage}_us")
        return value

    def summary(self, digits: int = 2) -> str:
        """One line, milliseconds: "server 4.50 ms (queue 0.10, …, search 1.00 ms; batch 1)".

        The one text form of a timing: `str()`, the CLI's search output and the demo use it.
        """
        stages = ", ".join(
            f"{stage} {self.stage_us(stage) / 1000:.{digits}f}" for stage in TIMING_STAGES
        )
        return f"server {self.total_ms:.{digits}f} ms ({stages} ms; batch {self.batch_size})"

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, int]:
        return {
            "queue_us": self.queue_us,
            "preprocess_us": self.preprocess_us,
            "inference_us": self.inference_us,
            "search_us": self.search_us,
            "total_us": self.total_us,
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class TowerInfo:
    precision: str
    providers: tuple[str, ...]
    max_batch_size: int


@dataclass(frozen=True)
class BatcherStats:
    """A tower batcher's live figures (`ServerInfo.batchers`): counts since the server
    started, and its queues at the time of the call."""

    name: str  # text | vision
    queued_interactive: int  # search and encode items waiting
    queued_bulk: int  # ingest items waiting
    batches: int
    items: int
    mean_batch_size: float
    dropped_cancelled: int  # dropped before running: the caller went away
    dropped_expired: int  # dropped before running: the deadline passed
    failed_batches: int
    rejected_overload: int  # submissions refused with RESOURCE_EXHAUSTED: queue full


@dataclass(frozen=True)
class ModelInfo:
    """One model a server serves (`Client.info().models`), and what loading it cost."""

    name: str
    family: str
    source_checkpoint: str
    model_id: str
    dim: int
    context_length: int
    image_size: int
    text: TowerInfo
    vision: TowerInfo
    is_default: bool
    memory_bytes: int  # process RSS growth while it loaded and warmed up
    startup_us: int  # wall time of its load and warm-up

    @property
    def precision(self) -> str:
        return self.text.precision

    @property
    def providers(self) -> tuple[str, ...]:
        return self.text.providers

    @property
    def memory_mb(self) -> float:
        return self.memory_bytes / 2**20

    @property
    def startup_s(self) -> float:
        return self.startup_us / 1e6


@dataclass(frozen=True)
class ServerInfo:
    """The models being served and the versions around them (`Client.info()`). The
    top-level model fields describe the default model; `models` lists every one, the
    default first."""

    model_name: str
    model_family: str
    source_checkpoint: str
    model_id: str
    dim: int
    context_length: int
    image_size: int
    text: TowerInfo
    vision: TowerInfo
    version: str
    versions: dict[str, str]
    store: str
    timing: Timing
    batchers: tuple[BatcherStats, ...] = ()
    models: tuple[ModelInfo, ...] = ()

    def model(self, name: str) -> ModelInfo:
        """The served model called `name` (KeyError if none is)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model {name!r} is served; served: {[m.name for m in self.models]}")


@dataclass(frozen=True)
class EncodeResult:
    """Embeddings in input order: `vectors` is float32 [n, dim], rows L2-normalized.

    From `encode_stream`, a request that failed comes back with `error` set (and no
    vectors) instead of ending the stream; `raise_for_error()` turns it into an exception.
    """

    vectors: np.ndarray
    truncated: list[bool]
    timing: Timing
    request_id: int = 0
    error: ClipsearchError | None = None
    model: str = ""  # the served model that encoded the inputs

    def raise_for_error(self) -> EncodeResult:
        """This result, or its error raised."""
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    uri: str
    caption: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "uri": self.uri,
            "caption": self.caption,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    query_truncated: bool
    timing: Timing
    model: str = ""  # the served model of the collection, which encoded the query

    def to_dict(self) -> dict[str, Any]:
        return {
            "hits": [hit.to_dict() for hit in self.hits],
            "query_truncated": self.query_truncated,
            "timing": self.timing.to_dict(),
            "model": self.model,
        }


@dataclass(frozen=True)
class CollectionResult:
    """One collection's answer in a `Comparison`, with the client's round trip."""

    collection: str
    result: SearchResult
    round_trip_us: int

    @property
    def model(self) -> str:
        return self.result.model

    @property
    def round_trip_ms(self) -> float:
        return self.round_trip_us / 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "model": self.model,
            "round_trip_us": self.round_trip_us,
            **{k: v for k, v in self.result.to_dict().items() if k != "model"},
        }


@dataclass(frozen=True)
class Comparison:
    """The same query against several collections (`Client.compare()`), in the order the
    collections were given: typically collections built with different models."""

    query: str  # the query in a few words: "text 'a red circle'", "image q.jpg"
    target: Target
    top_k: int
    results: list[CollectionResult]

    def __getitem__(self, collection: str) -> CollectionResult:
        for result in self.results:
            if result.collection == collection:
                return result
        raise KeyError(collection)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "target": self.target,
            "top_k": self.top_k,
            "collections": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True)
class Item:
    """A stored item (`Client.get()`); vectors only when asked for."""

    id: str
    uri: str
    caption: str
    metadata: dict[str, Any]
    image_vector: np.ndarray | None = None
    caption_vector: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "uri": self.uri,
            "caption": self.caption,
            "metadata": self.metadata,
        }
        if self.image_vector is not None:
            data["image_vector"] = self.image_vector.tolist()
        if self.caption_vector is not None:
            data["caption_vector"] = self.caption_vector.tolist()
        return data


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    count: int
    dim: int
    model_id: str
    model: str = ""  # the served model with that model_id; "" if the server serves none


@dataclass(frozen=True)
class IngestItem:
    """One image to ingest.

    Give the image as `image` bytes, or as a `path` that is read only when the item is sent
    (so a source of millions of items does not hold their bytes), or as an `image_vector`
    computed elsewhere (then `id` is required, and the ingest names the vectors' model with
    `vectors_model_id`). An empty `id` lets the server use a hash of the image bytes, so
    re-ingesting the same file never duplicates it. `uri` is stored as is (the server never
    fetches it); `metadata` must be JSON-serializable. A `caption` is encoded by the server
    unless its `caption_vector` comes with it. Vectors are sent as float32; the server checks
    their dimension and values and L2-normalizes them.
    """

    id: str = ""
    image: bytes | None = None
    path: str | os.PathLike[str] | None = None
    uri: str = ""
    caption: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    image_vector: np.ndarray | Sequence[float] | None = field(default=None, compare=False)
    caption_vector: np.ndarray | Sequence[float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [self.image is not None, self.path is not None, self.image_vector is not None]
        if sum(given) != 1:
            raise ValueError(
                "give an IngestItem exactly one of image (bytes), path or image_vector"
            )

    @property
    def label(self) -> str:
        """How to name the item in messages: its id, else its path or uri."""
        return self.id or (str(self.path) if self.path is not None else self.uri) or "<no id>"

    def read_image(self) -> bytes:
        """The image bytes (reads the file for path items; raises OSError if unreadable);
        empty for an item carrying its image vector."""
        if self.image is not None:
            return self.image
        if self.path is None:
            return b""
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class IngestResult:
    """The outcome of one ingested item, in the order the server finished them."""

    seq: int
    id: str
    status: IngestStatus
    error: str = ""
    error_code: str = ""  # a gRPC status name such as "INVALID_ARGUMENT" when failed
    caption_truncated: bool = False
    timing: Timing = field(default_factory=Timing)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class IngestSummary:
    """Counts of one ingest run, with the reason for each failed item."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, message)
    reconnects: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.skipped

    def add(self, result: IngestResult) -> None:
        if result.status == "ok":
            self.ok += 1
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            self.errors.append((result.id, result.error))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "skipped": self.skipped,
            "errors": [{"id": item_id, "error": error} for item_id, error in self.errors],
        }
