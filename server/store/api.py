"""The vector store contract: what the service needs from a vector database.

All methods are synchronous and safe to call from several threads at once (the service
calls them through `AsyncStore`, which runs them in its thread pool). Vectors are float32
and L2-normalized, so the inner product is the cosine similarity: every score is a cosine,
higher is better.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from clipsearch.server.limits import OUTPUT_FIELDS

__all__ = ["OUTPUT_FIELDS", "CollectionInfo", "StoreHit", "StoredItem", "Target", "VectorStore"]


class Target(enum.Enum):
    """Which vectors a search compares the query with."""

    IMAGE = "image"  # image vectors: text→image, image→image
    CAPTION = "caption"  # caption text vectors: text→text, image→text


@dataclass(frozen=True, eq=False)  # numpy arrays have no single truth value: compare fields
class StoredItem:
    """One stored item. `image_vector` is required on upsert; `caption_vector` is None for an
    item without a caption. Both are None in `get` results unless vectors were asked for."""

    id: str
    uri: str = ""
    caption: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    image_vector: np.ndarray | None = None
    caption_vector: np.ndarray | None = None


@dataclass(frozen=True)
class StoreHit:
    """One search result. Fields left out of `output_fields` are empty."""

    id: str
    score: float
    uri: str = ""
    caption: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    dim: int
    model_id: str
    count: int


class VectorStore(Protocol):
    def create_collection(self, name: str, dim: int, model_id: str, exist_ok: bool = False) -> bool:
        """Create `name` for vectors of `dim` made by `model_id`; True if it was created.

        Raises InvalidInput (bad name or dim), AlreadyExists (unless `exist_ok`), and
        ModelMismatch when `exist_ok` finds it built with another model or dim."""
        ...

    def drop_collection(self, name: str) -> None:
        """Raises NotFound."""
        ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def describe(self, name: str) -> CollectionInfo:
        """Raises NotFound."""
        ...

    def upsert(self, name: str, items: Sequence[StoredItem]) -> None:
        """Insert or replace `items` by id. When it returns, the items are durably written
        and visible to every search, get and count that follows. An item without a caption
        vector loses any caption vector an older version had. Within one call the last
        item with a given id wins."""
        ...

    def get(self, name: str, ids: Sequence[str], include_vectors: bool = False) -> list[StoredItem]:
        """The stored items among `ids`, in request order, each once; missing ids are left out."""
        ...

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]: ...

    def delete(self, name: str, ids: Sequence[str]) -> int:
        """Delete `ids`; returns how many of them existed."""
        ...

    def count(self, name: str, filter: str = "") -> int:
        """Exact number of items (matching `filter`, a Milvus boolean expression)."""
        ...

    def search(
        self,
        name: str,
        vector: np.ndarray,
        target: Target,
        top_k: int,
        *,
        offset: int = 0,
        filter: str = "",
        output_fields: Sequence[str] = (),
        params: Mapping[str, float] | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> list[StoreHit]:
        """The `top_k` items nearest to `vector` after skipping the `offset` nearest, best
        first. Raises InvalidInput (wrong dimension, unknown output field, bad params),
        InvalidFilter, NotFound."""
        ...

    def close(self) -> None: ...
