"""Vector storage: the `VectorStore` contract and `MilvusStore` (Milvus Lite or a server)."""

from clipsearch.server.store.api import (
    OUTPUT_FIELDS,
    CollectionInfo,
    StoredItem,
    StoreHit,
    Target,
    VectorStore,
)
from clipsearch.server.store.indexing import IndexConfig
from clipsearch.server.store.milvus import MilvusStore

__all__ = [
    "OUTPUT_FIELDS",
    "CollectionInfo",
    "IndexConfig",
    "MilvusStore",
    "StoreHit",
    "StoredItem",
    "Target",
    "VectorStore",
]
