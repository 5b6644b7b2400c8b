"""Vector helpers shared by the encoder, the store and the service."""

from __future__ import annotations

import numpy as np

from clipsearch.server.errors import InvalidInput


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    normalized: np.ndarray = x / np.maximum(norms, np.float32(1e-12))
    return normalized


def to_bytes(vector: np.ndarray) -> bytes:
    """The wire form: little-endian float32."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_bytes(data: bytes, dim: int, what: str = "vector") -> np.ndarray:
    """Parse a wire vector, checking its size against the model's dimension."""
    if len(data) % 4:
        raise InvalidInput(f"{what} has {len(data)} bytes, not a whole number of float32s")
    vector = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if vector.shape[0] != dim:
        raise InvalidInput(f"{what} has dimension {vector.shape[0]}, the model's is {dim}")
    if not np.all(np.isfinite(vector)):
        raise InvalidInput(f"{what} contains NaN or infinity")
    return vector
