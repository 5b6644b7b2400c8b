"""`InMemoryStore`: the `VectorStore` contract in process memory, with exact search.

For tests (the service's own fast tests use it, and so can users' tests of code built on
clipsearch): nothing is persisted, and search is an exact numpy inner product over every
stored vector. It checks its input like `MilvusStore` and raises the same domain errors,
which tests/test_store_contract.py verifies by running the same checks on both.

Filters: a subset of Milvus expressions, evaluated in Python (see `memory_filters`); an
expression outside it raises InvalidFilter, as an unparsable one does on Milvus.

Threads: one lock around every call, so the store is safe to call from several threads.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from clipsearch.server.errors import (
    AlreadyExists,
    InvalidInput,
    ModelMismatch,
    NotFound,
    Unavailable,
)
from clipsearch.server.store import validation
from clipsearch.server.store.api import (
    CollectionInfo,
    StoredItem,
    StoreHit,
    Target,
)
from clipsearch.server.store.indexing import IndexConfig, check_window, search_params
from clipsearch.server.store.memory_filters import compile_filter, matches

# Search params are checked as they would be for an exact (FLAT) Milvus index.
_EXACT = IndexConfig.defaults_for("FLAT", "IP")


@dataclass
class _Collection:
    dim: int
    model_id: str
    items: dict[str, StoredItem] = field(default_factory=dict)  # vectors always set


class InMemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collections: dict[str, _Collection] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"InMemoryStore({len(self._collections)} collections)"

    # --- collections ---------------------------------------------------------------------

    def create_collection(self, name: str, dim: int, model_id: str, exist_ok: bool = False) -> bool:
        validation.check_collection_name(name)
        validation.check_dim(dim)
        validation.check_model_id(model_id)
        with self._lock:
            self._check_open()
            existing = self._collections.get(name)
            if existing is None:
                self._collections[name] = _Collection(dim, model_id)
                return True
            if not exist_ok:
                raise AlreadyExists(f"collection {name!r} already exists")
            if (existing.dim, existing.model_id) != (dim, model_id):
                raise ModelMismatch(
                    f"collection {name!r} holds {existing.dim}-d vectors of model "
                    f"{existing.model_id!r}, not {dim}-d vectors of {model_id!r}"
                )
            return False

    def drop_collection(self, name: str) -> None:
        validation.check_collection_name(name)
        with self._lock:
            self._collection(name)
            del self._collections[name]

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock:
            self._check_open()
            return [self._info(name) for name in sorted(self._collections)]

    def describe(self, name: str) -> CollectionInfo:
        with self._lock:
            self._collection(name)
            return self._info(name)

    # --- items ---------------------------------------------------------------------------

    def upsert(self, name: str, items: Sequence[StoredItem]) -> None:
        with self._lock:
            collection = self._collection(name)
            for item in items:
                validation.check_id(item.id)
            latest = {item.id: item for item in items}  # the last version of an id wins
            stored = [_stored(item, collection.dim) for item in latest.values()]
            for item in stored:  # every item is valid: now write them all
                collection.items[item.id] = item

    def get(self, name: str, ids: Sequence[str], include_vectors: bool = False) -> list[StoredItem]:
        with self._lock:
            collection = self._collection(name)
            wanted = _checked_ids(ids)
            return [
                _copy(collection.items[i], include_vectors) for i in wanted if i in collection.items
            ]

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        with self._lock:
            collection = self._collection(name)
            return {i for i in _checked_ids(ids) if i in collection.items}

    def delete(self, name: str, ids: Sequence[str]) -> int:
        with self._lock:
            collection = self._collection(name)
            existing = [i for i in _checked_ids(ids) if i in collection.items]
            for item_id in existing:
                del collection.items[item_id]
            return len(existing)

    def count(self, name: str, filter: str = "") -> int:
        with self._lock:
            collection = self._collection(name)
            predicate = compile_filter(filter)
            return sum(matches(predicate, _row(item)) for item in collection.items.values())

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
        check_window(top_k, offset)
        with self._lock:
            collection = self._collection(name)
            query = validation.unit_vector(vector, collection.dim, "query vector")
            fields = validation.output_fields(output_fields)
            excluded = set(_unique_ids(exclude_ids))
            predicate = compile_filter(filter)
            search_params(_EXACT, top_k, offset, params)  # refuse what Milvus would refuse
            candidates: list[tuple[StoredItem, np.ndarray]] = []
            for item in collection.items.values():
                stored = _vector_of(item, target)
                if stored is None or item.id in excluded or not matches(predicate, _row(item)):
                    continue
                candidates.append((item, stored))
            if not candidates:
                return []
            scores = np.stack([stored for _, stored in candidates]) @ query
            order = np.argsort(-scores, kind="stable")[offset : offset + top_k]
            return [_hit(candidates[i][0], float(scores[i]), fields) for i in order]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._collections.clear()

    def __enter__(self) -> InMemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals (called with the lock held) -------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the vector store is closed")

    def _collection(self, name: str) -> _Collection:
        self._check_open()
        collection = self._collections.get(name) if isinstance(name, str) else None
        if collection is not None:
            return collection
        if not (isinstance(name, str) and name.endswith(validation.COMPANION_SUFFIX)):
            validation.check_collection_name(name)
        raise NotFound(f"collection {name!r} does not exist")

    def _info(self, name: str) -> CollectionInfo:
        collection = self._collections[name]
        return CollectionInfo(name, collection.dim, collection.model_id, len(collection.items))


def _stored(item: StoredItem, dim: int) -> StoredItem:
    """A private copy of `item` as Milvus would store it. Raises InvalidInput naming it."""
    item = validation.check_item(item, dim)
    image, caption = item.image_vector, item.caption_vector
    return replace(
        item,
        metadata=json.loads(json.dumps(item.metadata)),
        image_vector=None if image is None else image.copy(),
        caption_vector=None if caption is None else caption.copy(),
    )


def _copy(item: StoredItem, include_vectors: bool) -> StoredItem:
    image, caption = item.image_vector, item.caption_vector
    return StoredItem(
        id=item.id,
        uri=item.uri,
        caption=item.caption,
        metadata=json.loads(json.dumps(item.metadata)),
        image_vector=image.copy() if include_vectors and image is not None else None,
        caption_vector=caption.copy() if include_vectors and caption is not None else None,
    )


def _row(item: StoredItem) -> dict[str, Any]:
    return {"id": item.id, "uri": item.uri, "caption": item.caption, "metadata": item.metadata}


def _vector_of(item: StoredItem, target: Target) -> np.ndarray | None:
    return item.image_vector if target is Target.IMAGE else item.caption_vector


def _hit(item: StoredItem, score: float, fields: tuple[str, ...]) -> StoreHit:
    return StoreHit(
        id=item.id,
        score=score,
        uri=item.uri if "uri" in fields else "",
        caption=item.caption if "caption" in fields else "",
        metadata=json.loads(json.dumps(item.metadata)) if "metadata" in fields else {},
    )


def _unique_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidInput("ids must be a list of strings, not one string")
    return list(dict.fromkeys(ids))


def _checked_ids(ids: Sequence[str]) -> list[str]:
    wanted = _unique_ids(ids)
    for item_id in wanted:
        validation.check_id(item_id)
    return wanted
