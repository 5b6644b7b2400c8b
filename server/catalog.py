"""Collections as the served model sees them.

A collection records the model it was built with; searching or ingesting it with another
model would compare vectors from different spaces, so that fails with FAILED_PRECONDITION.
Descriptions are cached per collection and forgotten on create/drop or when the store says
the collection is gone.
"""

from __future__ import annotations

from clipsearch.server.async_store import AsyncStore
from clipsearch.server.errors import ModelMismatch, NotFound
from clipsearch.server.store import CollectionInfo


class Catalog:
    def __init__(self, store: AsyncStore, model_id: str, dim: int) -> None:
        self.store = store
        self.model_id = model_id
        self.dim = dim
        self._known: dict[str, CollectionInfo] = {}

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
        created, store_us = await self.store.create_collection(
            name, self.dim, self.model_id, exist_ok=exist_ok
        )
        self._known.pop(name, None)
        if not created:  # it existed: make sure it is ours
            _, more_us = await self.require(name)
            store_us += more_us
        return created, store_us

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
