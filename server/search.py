"""Search in four directions: a text, an image, a vector or a stored item against image
vectors, caption vectors, or both.

TARGET_BOTH runs the image and the caption search for the top `offset + top_k` of each and
fuses the two rankings by reciprocal rank fusion: score(item) = sum over rankings of
1 / (RRF_K + rank), rank starting at 1. RRF needs no score calibration between the two
spaces (image-text cosines run lower than text-text ones) and rewards items both agree on.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.errors import InvalidInput, NotFound
from clipsearch.server.limits import MAX_TOP_K
from clipsearch.server.pipeline import EncodingPipeline, StageTiming
from clipsearch.server.store import StoreHit, Target, validation
from clipsearch.server.store.indexing import check_window
from clipsearch.server.vectors import l2_normalize

RRF_K = 60


class SearchTarget(enum.Enum):
    IMAGE = "image"
    CAPTION = "caption"
    BOTH = "both"


@dataclass(frozen=True)
class SearchQuery:
    collection: str
    text: str | None = None
    image: bytes | None = None
    vector: np.ndarray | None = None
    like_id: str | None = None
    target: SearchTarget = SearchTarget.IMAGE
    top_k: int = 10
    offset: int = 0
    filter: str = ""
    output_fields: tuple[str, ...] = ()
    params: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        given = [
            name
            for name, value in (
                ("text", self.text),
                ("image", self.image),
                ("vector", self.vector),
                ("like_id", self.like_id),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise InvalidInput("set exactly one query: text, image, vector or like_id")
        if self.text is not None and not self.text.strip():
            raise InvalidInput("the query text is empty")
        if self.image is not None and not self.image:
            raise InvalidInput("the query image is empty (0 bytes)")
        if self.like_id is not None and not self.like_id:
            raise InvalidInput("like_id is empty")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        check_window(self.top_k, self.offset)
        validation.output_fields(self.output_fields)


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[StoreHit]
    query_truncated: bool
    encoding: StageTiming
    store_us: int


def fuse_rrf(rankings: Sequence[Sequence[StoreHit]], k: int = RRF_K) -> list[StoreHit]:
    """Reciprocal rank fusion; ties broken by id so pages are stable."""
    scores: dict[str, float] = {}
    first_seen: dict[str, StoreHit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (k + rank)
            first_seen.setdefault(hit.id, hit)
    order = sorted(scores, key=lambda item_id: (-scores[item_id], item_id))
    return [replace(first_seen[item_id], score=scores[item_id]) for item_id in order]


class Searcher:
    def __init__(self, pipeline: EncodingPipeline, store: AsyncStore) -> None:
        self.pipeline = pipeline
        self.store = store

    async def search(self, query: SearchQuery, deadline: float | None = None) -> SearchOutcome:
        query.validate()
        vector, truncated, encoding, total_us = await self._query_vector(query, deadline)
        common: dict[str, Any] = {
            "filter": query.filter,
            "output_fields": validation.output_fields(query.output_fields),
            "params": query.params,
            "exclude_ids": (query.like_id,) if query.like_id is not None else (),
        }
        if query.target is SearchTarget.BOTH:
            window = query.offset + query.top_k
            rankings = []
            for target in (Target.IMAGE, Target.CAPTION):
                hits, store_us = await self.store.search(
                    query.collection, vector, target, window, offset=0, **common
                )
                rankings.append(hits)
                total_us += store_us
            hits = fuse_rrf(rankings)[query.offset : window]
        else:
            target = Target.IMAGE if query.target is SearchTarget.IMAGE else Target.CAPTION
            hits, store_us = await self.store.search(
                query.collection, vector, target, query.top_k, offset=query.offset, **common
            )
            total_us += store_us
        return SearchOutcome(hits, truncated, encoding, total_us)

    async def _query_vector(
        self, query: SearchQuery, deadline: float | None
    ) -> tuple[np.ndarray, bool, StageTiming, int]:
        """The query as a unit vector, whether its text was truncated, and timings."""
        if query.text is not None:
            encoded = await self.pipeline.encode_texts([query.text], deadline=deadline)
            return encoded.vectors[0], encoded.truncated[0], encoded.timing, 0
        if query.image is not None:
            encoded = await self.pipeline.encode_images([query.image], deadline=deadline)
            return encoded.vectors[0], False, encoded.timing, 0
        if query.vector is not None:
            return l2_normalize(query.vector), False, StageTiming(), 0
        assert query.like_id is not None
        items, store_us = await self.store.get(query.collection, [query.like_id], True)
        if not items or items[0].image_vector is None:
            raise NotFound(f"no item {query.like_id!r} in collection {query.collection!r}")
        return items[0].image_vector, False, StageTiming(), store_us
