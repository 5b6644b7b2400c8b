"""Collections as the served model sees them.

A collection records the model it was built with; searching or ingesting it with another
model would compare vectors from different spaces, so that fails with FAILED_PRECONDITION.
Descriptions are cached per collection and forgotten on create/drop or when the store says
the collection is gone. At most `max_collections` collections may exist: each costs
memory and threads in the store, and a writer in the server.
"""

from __future__ import annotations

import asyncio

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.errors import ModelMismatch, NotFound, TooManyCollections
from clipsearch.server.store import CollectionInfo

DEFAULT_MAX_COLLECTIONS = 64


class Catalog:
    def __init__(
        self,
        store: AsyncStore,
        model_id: str,
        dim: int,
        max_collections: int = DEFAULT_MAX_COLLECTIONS,
    ) -> None:
        self.store = store
        self.model_id = model_id
        self.dim = dim
        self.max_collections = max_collections
        self._known: dict[str, CollectionInfo] = {}
        self._creating = asyncio.Lock()  # so two creates cannot both take the last place

    async def require(self, name: str) -> tuple[CollectionInfo, int]:
        """The collection's description (NotFound, ModelMismatch) and store microseconds."""
        info = self._known.get(name)
        store_us = 0
        if info is None:
            info, store_us = await self.store.describe(name)
            if info.model_id != self.model_id or info.dim != self.dim:
                raise ModelMismatch(
                    f"collection {name!r} was built with model {info.model_id} (dim {info.dim}); "
                    f"this server runs {self.model_id} (dim {self.dim}). Re-ingest into a new "
                    "collection, or serve the collection's model."
                )
            self._known[name] = info
        return info, store_us

    async def create(self, name: str, exist_ok: bool) -> tuple[bool, int]:
        if name in self._known:  # every ingest stream asks: a known collection has its place
            created, store_us = await self._create(name, exist_ok)
        else:
            async with self._creating:
                check_us = await self._check_room(name)
                created, store_us = await self._create(name, exist_ok)
                store_us += check_us
        self._known.pop(name, None)
        if not created:  # it existed: make sure it is ours
            _, more_us = await self.require(name)
            store_us += more_us
        return created, store_us

    async def _create(self, name: str, exist_ok: bool) -> tuple[bool, int]:
        return await self.store.create_collection(name, self.dim, self.model_id, exist_ok=exist_ok)

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

    async def guarded(self, name: str) -> int:
        """`require`, forgetting the cache entry if the store no longer has it."""
        try:
            return (await self.require(name))[1]
        except NotFound:
            self.forget(name)
            raise
