"""The rules an item must meet to be stored, and the other checks done before anything
reaches Milvus, so bad input gets a clear InvalidInput (Milvus Lite answers some of these
with an obscure numpy error, Milvus 2.3 with an assert).

Ingest applies `check_fields` on arrival and `check_vectors` once the item is encoded,
before it joins a shared write batch, so one client's bad item never fails another's; the
store applies both (`check_item`) to whatever it is given. The limits are in
`clipsearch.server.limits`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from clipsearch.server.errors import InvalidInput
from clipsearch.server.limits import (
    MAX_CAPTION_BYTES,
    MAX_ID_BYTES,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_URI_BYTES,
    OUTPUT_FIELDS,
)
from clipsearch.server.store.api import StoredItem

# Caption vectors live in a companion collection named after the main one (see milvus.py).
COMPANION_SUFFIX = "__captions"
MAX_NAME_LENGTH = 255 - len(COMPANION_SUFFIX)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_DIM, MAX_DIM = 2, 32768
MAX_MODEL_ID_LENGTH = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
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
    size = _utf8_size(item_id, "item id")
    if size > MAX_ID_BYTES:
        raise InvalidInput(
            f"item id {item_id[:40]!r}... is {size} bytes long (UTF-8), at most {MAX_ID_BYTES} "
            "allowed"
        )
    if _CONTROL.search(item_id):
        raise InvalidInput(f"item id {item_id!r} contains a control character")


def check_text(value: str, what: str, limit: int, item_id: str) -> None:
    """A uri or caption: at most `limit` UTF-8 bytes, no control characters but tab, line
    feed and carriage return."""
    if not isinstance(value, str):
        raise InvalidInput(f"item {item_id!r}: {what} must be a string")
    check_text_bytes(value, limit, f"item {item_id!r}: {what}")
    if _TEXT_CONTROL.search(value):
        raise InvalidInput(f"item {item_id!r}: {what} contains a control character")


def check_text_bytes(value: str, limit: int, what: str, setting: str = "") -> None:
    """The one size rule for text: at most `limit` UTF-8 bytes (`setting`: the setting that
    sets `limit`, named in the message). Encodes only where the length cannot decide."""
    if len(value) * 4 <= limit:  # a character is at most 4 bytes
        return
    named = f" (setting {setting})" if setting else ""
    if value.isascii():  # O(1) in CPython
        size = len(value)
    elif len(value) > limit:
        raise InvalidInput(
            f"{what} is {len(value)} characters, more than {limit} bytes allowed{named}"
        )
    else:
        size = _utf8_size(value, what)
    if size > limit:
        raise InvalidInput(f"{what} is {size} bytes, at most {limit} allowed{named}")


def parse_metadata(raw: str, item_id: str) -> dict[str, Any]:
    """Metadata sent as JSON text: a JSON object within the size and depth limits."""
    if not raw:
        return {}
    if _utf8_size(raw, f"item {item_id!r}: metadata") > MAX_METADATA_BYTES:
        raise InvalidInput(f"item {item_id!r}: metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"item {item_id!r}: metadata is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"item {item_id!r}: metadata must be a JSON object")
    return value


def check_metadata(metadata: dict[str, Any], item_id: str) -> None:
    if not isinstance(metadata, dict):
        raise InvalidInput(f"item {item_id!r}: metadata must be a JSON object")
    if _deeper_than(metadata, MAX_METADATA_DEPTH):
        raise InvalidInput(
            f"item {item_id!r}: metadata is nested more than {MAX_METADATA_DEPTH} levels deep"
        )
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"item {item_id!r}: metadata is not valid JSON: {exc}") from None
    if len(encoded) > MAX_METADATA_BYTES:  # ensure_ascii: characters are bytes
        raise InvalidInput(f"item {item_id!r}: metadata is larger than {MAX_METADATA_BYTES} bytes")


def check_fields(item: StoredItem) -> None:
    """The item's id, uri, caption and metadata (everything but its vectors)."""
    check_id(item.id)
    check_text(item.uri, "uri", MAX_URI_BYTES, item.id)
    check_text(item.caption, "caption", MAX_CAPTION_BYTES, item.id)
    check_metadata(item.metadata, item.id)


def check_vectors(item: StoredItem, dim: int) -> StoredItem:
    """The item's vectors: finite, of dimension `dim`, an image vector present. Returns the
    item with float32 unit vectors."""
    if item.image_vector is None:
        raise InvalidInput(f"item {item.id!r} has no image vector")
    image = unit_vector(item.image_vector, dim, f"item {item.id!r}: image vector")
    caption = None
    if item.caption_vector is not None:
        caption = unit_vector(item.caption_vector, dim, f"item {item.id!r}: caption vector")
    return replace(item, image_vector=image, caption_vector=caption)


def check_vectors_each(items: Sequence[StoredItem], dim: int) -> list[StoredItem | InvalidInput]:
    """`check_vectors` of each item, its result or its error: the vectors of all of them
    checked at once, item by item only where one is not already a finite float32 unit
    vector of dimension `dim` (the encoder's output always is)."""
    fine = _unit_rows([item.image_vector for item in items], dim)
    captioned = [i for i, item in enumerate(items) if item.caption_vector is not None]
    caption_fine = _unit_rows([items[i].caption_vector for i in captioned], dim)
    fine_caption = dict(zip(captioned, caption_fine, strict=True))
    results: list[StoredItem | InvalidInput] = []
    for index, item in enumerate(items):
        if fine[index] and fine_caption.get(index, True):
            results.append(item)
            continue
        try:
            results.append(check_vectors(item, dim))
        except InvalidInput as exc:
            results.append(exc)
    return results


def _unit_rows(vectors: Sequence[Any], dim: int) -> list[bool]:
    """Per vector: is it already a 1-D float32 array of `dim` finite values and unit norm
    (what `unit_vector` returns unchanged)?"""
    if not vectors:
        return []
    if not all(
        isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (dim,) for v in vectors
    ):
        return [False] * len(vectors)
    rows = np.stack(vectors)
    finite = np.isfinite(rows).all(axis=1)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    return list(finite & (np.abs(norms - 1.0) <= NORM_TOLERANCE))


def check_item(item: StoredItem, dim: int) -> StoredItem:
    """The one check of an item to be written: its fields and its vectors. Returns the item
    with float32 unit vectors. Raises InvalidInput naming the item (and no other)."""
    check_fields(item)
    return check_vectors(item, dim)


def check_items(items: Sequence[StoredItem], dim: int) -> list[StoredItem]:
    """`check_item` of each item, the vectors checked at once; raises the first bad item's
    InvalidInput."""
    checked = []
    for item, result in zip(items, check_vectors_each(items, dim), strict=True):
        check_fields(item)
        if isinstance(result, InvalidInput):
            raise result
        checked.append(result)
    return checked


def output_fields(requested: Sequence[str]) -> tuple[str, ...]:
    """The fields a search returns: `requested` checked and deduplicated, or all of them."""
    if isinstance(requested, str):
        raise InvalidInput("output_fields must be a list of field names, not one string")
    unknown = [f for f in requested if f not in OUTPUT_FIELDS]
    if unknown:
        raise InvalidInput(
            f"unknown output field {unknown[0]!r} in output_fields: choose from "
            f"{', '.join(OUTPUT_FIELDS)}"
        )
    return tuple(dict.fromkeys(requested)) or OUTPUT_FIELDS


def _utf8_size(value: str, what: str) -> int:
    try:
        return len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate: only possible from Python callers
        raise InvalidInput(f"{what} is not valid Unicode (a lone surrogate)") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _deeper_than(value: Any, limit: int) -> bool:
    """Do objects and arrays nest more than `limit` levels in `value`? (Iterative: a value
    too deep for recursion gets an answer too.)"""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


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
