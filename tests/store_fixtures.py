"""Milvus backends for tests: Milvus Lite in a temp dir, and a real `milvus-server` process
(`clipsearch.bench.milvus_server`, shared with the fault benchmarks)."""

from __future__ import annotations

import numpy as np

from clipsearch.bench.milvus_server import (
    MilvusServerError,
    MilvusServerProcess,
    free_port,
    milvus_server_executable,
)
from clipsearch.server.store import StoredItem

__all__ = [
    "MilvusServerError",
    "MilvusServerProcess",
    "free_port",
    "milvus_server_executable",
    "stored_items",
    "unit_vectors",
]


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """`count` random L2-normalized float32 vectors, reproducible from `seed`."""
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    normalized: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalized


def stored_items(ids: list[str], seed: int, dim: int, captioned: bool = True) -> list[StoredItem]:
    """Items `ids` with reproducible vectors (from `seed`), a uri, metadata and, if
    `captioned`, a caption and its vector."""
    images, captions = unit_vectors(len(ids), dim, seed), unit_vectors(len(ids), dim, seed + 1)
    return [
        StoredItem(
            id=item_id,
            uri=f"file:///images/{item_id}.png",
            caption=f"caption of {item_id}" if captioned else "",
            metadata={"n": n, "seed": seed},
            image_vector=images[n],
            caption_vector=captions[n] if captioned else None,
        )
        for n, item_id in enumerate(ids)
    ]
