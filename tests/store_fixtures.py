"""Milvus backends for tests: Milvus Lite in a temp dir, and a real `milvus-server` process
(`clipsearch.bench.milvus_server`, shared with `clipsearch bench ingest`)."""

from __future__ import annotations

import numpy as np

from clipsearch.bench.milvus_server import (
    MilvusServerError,
    MilvusServerProcess,
    free_port,
    milvus_server_executable,
)

__all__ = [
    "MilvusServerError",
    "MilvusServerProcess",
    "free_port",
    "milvus_server_executable",
    "unit_vectors",
]


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """`count` random L2-normalized float32 vectors, reproducible from `seed`."""
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    normalized: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalized
