"""Checks done before anything reaches Milvus, so bad input gets a clear InvalidInput
(Milvus Lite answers some of these with an obscure numpy error, Milvus 2.3 with an assert)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from clipsearch.server.errors import InvalidInput

# Caption vectors live in a companion collection named after the main one (see milvus.py).
COMPANION_SUFFIX = "__captions"
MAX_NAME_LENGTH = 255 - len(COMPANION_SUFFIX)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_DIM, MAX_DIM = 2, 32768
MAX_MODEL_ID_LENGTH = 1024
# VARCHAR limits of the schema, in UTF-8 bytes (what Milvus counts).
MAX_ID_BYTES = 512
MAX_URI_BYTES = 4096
MAX_CAPTION_BYTES = 8192
MAX_METADATA_BYTES = 65536
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Vectors farther than this from unit length are normalized on write; closer ones are
# stored exactly as given (so a normalized float32 vector reads back bit for bit).
NORM_TOLERANCE = 1e-4


def check_collection_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidInput("collection name must be a non-empty string")
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid collection name {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"collection name {name[:20]!r}... is {len(name)} characters long, "
            f"at most {MAX_NAME_LENGTH} allowed"
        )
    if name.endswith(COMPANION_SUFFIX):
        raise InvalidInput(f"collection names ending in {COMPANION_SUFFIX!r} are reserved")


def check_dim(dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or not MIN_DIM <= dim <= MAX_DIM:
        raise InvalidInput(f"vector dimension must be an integer in [{MIN_DIM}, {MAX_DIM}]")


def check_model_id(model_id: str) -> None:
    if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_MODEL_ID_LENGTH:
        raise InvalidInput(f"model id must be 1 to {MAX_MODEL_ID_LENGTH} characters")


def check_id(item_id: str) -> None:
    if not isinstance(item_id, str) or not item_id:
        raise InvalidInput("item id must be a non-empty string")
    if len(item_id.encode()) > MAX_ID_BYTES:
        raise InvalidInput(f"item id {item_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes")
    if _CONTROL.search(item_id):
        raise InvalidInput(f"item id {item_id!r} contains a control character")


def check_text(value: str, what: str, limit: int, item_id: str) -> None:
    if not isinstance(value, str):
        raise InvalidInput(f"item {item_id!r}: {what} must be a string")
    size = len(value.encode())
    if size > limit:
        raise InvalidInput(f"item {item_id!r}: {what} is {size} bytes, at most {limit} allowed")


def check_metadata(metadata: dict[str, Any], item_id: str) -> None:
    if not isinstance(metadata, dict):
        raise InvalidInput(f"item {item_id!r}: metadata must be a JSON object")
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"item {item_id!r}: metadata is not valid JSON: {exc}") from None
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidInput(f"item {item_id!r}: metadata is larger than {MAX_METADATA_BYTES} bytes")


def unit_vector(value: Any, dim: int, what: str) -> np.ndarray:
    """`value` as a 1-D float32 vector of length `dim` and unit L2 norm."""
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} is not a vector of numbers") from None
    if vector.ndim != 1:
        raise InvalidInput(f"{what} must be one vector, got an array of shape {vector.shape}")
    if vector.shape[0] != dim:
        raise InvalidInput(f"{what} has dimension {vector.shape[0]}, expected {dim}")
    if not np.isfinite(vector).all():
        raise InvalidInput(f"{what} contains NaN or infinity")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm == 0.0 or not math.isfinite(norm):
        raise InvalidInput(f"{what} is the zero vector")
    if abs(norm - 1.0) > NORM_TOLERANCE:
        vector = (vector / norm).astype(np.float32)
    return vector
