"""Collections as the served models see them.

A collection records the model it was built with (its model id and dim). A server may serve
several models: a collection is searched and filled with the served model of its model id;
if none has it, vectors from different spaces would be compared, so that fails with
FAILED_PRECONDITION, as does asking for one model on a collection built with another.
Descriptions are cached per collection and forgotten on create/drop or when the store says
the collection is gone. At most `max_collections` collections may exist: each costs
memory and threads in the store, and a writer in the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.errors import ModelMismatch, NotFound, TooManyCollections
from clipsearch.server.store import CollectionInfo

DEFAULT_MAX_COLLECTIONS = 64


@dataclass(frozen=True)
class ModelRef:
    """What the catalog knows of a served model."""

    name: str
    model_id: str
    dim: int

    def __str__(self) -> str:
        return f"{self.name} (model_id {self.model_id}, dim {self.dim})"


class Catalog:
    def __init__(
        self,
        store: AsyncStore,
        models: Sequence[ModelRef],
        max_collections: int = DEFAULT_MAX_COLLECTIONS,
    ) -> None:
        if not models:
            raise ValueError("a catalog needs at least one served model")
        self.store = store
        self.models = tuple(models)
        self.max_collections = max_collections
        self._known: dict[str, tuple[CollectionInfo, ModelRef]] = {}
        self._creating = asyncio.Lock()  # so two creates cannot both take the last place

    @property
    def default(self) -> ModelRef:
        return self.models[0]

    def served(self, info: CollectionInfo) -> ModelRef | None:
        """The served model that built the collection, if any."""
        for model in self.models:
            if (model.model_id, model.dim) == (info.model_id, info.dim):
                return model
        return None

    async def require(
        self, name: str, expected: ModelRef | None = None
    ) -> tuple[CollectionInfo, ModelRef, int]:
        """The collection's description, the served model it was built with, and store
        microseconds. NotFound; ModelMismatch if no served model built it, or if
        `expected` is given and did not."""
        known = self._known.get(name)
        store_us = 0
        if known is None:
            info, store_us = await self.store.describe(name)
            model = self.served(info)
            if model is None:
                served = ", ".join(str(m) for m in self.models)
                raise ModelMismatch(
                    f"collection {name!r} was built with model {info.model_id} (dim {info.dim}); "
                    f"this server serves {served}. Re-ingest into a new collection, or serve "
                    "the collection's model."
                )
            known = self._known[name] = (info, model)
        info, model = known
        if expected is not None and expected != model:
            raise ModelMismatch(
                f"collection {name!r} was built with model {model}, not with {expected} as "
                "asked; use its model, or another collection"
            )
        return info, model, store_us

    async def create(self, name: str, exist_ok: bool, model: ModelRef) -> tuple[bool, int]:
        """Create `name` for `model`: True if created, False if it existed (with
        `exist_ok`), ModelMismatch if it exists for another model."""
        try:
            if name in self._known:  # every ingest stream asks: a known collection has its place
                created, store_us = await self._create(name, exist_ok, model)
            else:
                async with self._creating:
                    check_us = await self._check_room(name)
                    created, store_us = await self._create(name, exist_ok, model)
                    store_us += check_us
        except ModelMismatch:
            self._known.pop(name, None)
            await self.require(name, model)  # raises the mismatch naming both models
            raise
        self._known.pop(name, None)
        if not created:  # it existed: make sure it is this model's
            _, _, more_us = await self.require(name, model)
            store_us += more_us
        return created, store_us

    async def _create(self, name: str, exist_ok: bool, model: ModelRef) -> tuple[bool, int]:
        return await self.store.create_collection(
            name, model.dim, model.model_id, exist_ok=exist_ok
        )

    async def _check_room(self, name: str) -> int:
        """TooManyCollections if `name` is new and the store holds the maximum already."""
        infos, store_us = await self.store.list_collections()
        names = {info.name for info in infos}
        if name not in names and len(names) >= self.max_collections:
            raise TooManyCollections(
                f"cannot create collection {name!r}: {len(names)} collections exist, the "
                f"most this server allows (max_collections={self.max_collections}); drop one "
                "or restart the server with a larger --max-collections"
            )
        return store_us

    async def drop(self, name: str) -> int:
        self._known.pop(name, None)
        _, store_us = await self.store.drop_collection(name)
        return store_us

    def forget(self, name: str) -> None:
        self._known.pop(name, None)

    async def guarded(self, name: str, expected: ModelRef | None = None) -> tuple[ModelRef, int]:
        """`require` (the collection's model and store µs), forgetting the cache entry if
        the store no longer has the collection."""
        try:
            _, model, store_us = await self.require(name, expected)
        except NotFound:
            self.forget(name)
            raise
        return model, store_us
