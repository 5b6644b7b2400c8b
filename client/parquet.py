"""Parquet sources: the one reader of `clipsearch ingest FILE.parquet` and `clipsearch bulk`.

A `.parquet` file, or a directory of them (read in sorted order), one item per row:

- `id`, `uri` (stored as given, never fetched), `caption` (or the column `caption_field`
  names), `metadata` (a JSON object as a string), every other column into metadata, as in a
  CSV manifest (`clipsearch.client.sources`);
- `image_vector` and optional `caption_vector`: vectors computed elsewhere (lists of float32,
  list or fixed-size list), sent as they are and never re-encoded. A row whose image_vector
  is null names its image file with `path` (or a local `uri`), read and encoded as a manifest
  row's is, so one file may mix both kinds.

The producer states the model that computed the vectors once: `--model-id`, or the key
`clipsearch.model_id` of the file's schema metadata (`model_id()` reads it).

Vector columns are read a record batch at a time into numpy (no Python float per value),
so 100k rows of 512-d vectors take a fraction of a second to read. Needs pyarrow (the
`[parquet]` extra); importing this module without it raises ImportError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch.client.sources import (
    PARQUET_SUFFIX,
    RowError,
    SourceError,
    row_item,
    row_metadata,
)
from clipsearch.client.types import IngestItem

IMAGE_VECTOR = "image_vector"
CAPTION_VECTOR = "caption_vector"
VECTOR_COLUMNS = (IMAGE_VECTOR, CAPTION_VECTOR)
MODEL_ID_KEY = b"clipsearch.model_id"
DEFAULT_CAPTION_FIELD = "caption"


def vectors_schema(model_id: str | None) -> pa.Schema:
    """The columns a file of vectors computed elsewhere has, for a writer: the layout this
    module reads, with the model id in the schema's metadata when given."""
    vector = pa.list_(pa.float32())
    return pa.schema(
        [
            ("id", pa.string()),
            ("uri", pa.string()),
            ("caption", pa.string()),
            ("metadata", pa.string()),
            (IMAGE_VECTOR, vector),
            (CAPTION_VECTOR, vector),
        ],
        metadata={MODEL_ID_KEY: model_id.encode()} if model_id else None,
    )


@dataclass(frozen=True)
class ParquetRow:
    """One row: `where` (FILE:ROW, rows counted from 1), its scalar columns with `metadata`
    parsed, the folder relative paths are resolved against, and its vectors if any."""

    where: str
    record: dict[str, Any]
    base: Path
    image_vector: np.ndarray | None = None
    caption_vector: np.ndarray | None = None


def is_parquet(source: str | os.PathLike[str]) -> bool:
    return Path(source).suffix.lower() == PARQUET_SUFFIX


def parquet_files(path: Path) -> tuple[list[Path], Path]:
    """The files of a Parquet source and the folder relative paths are resolved against."""
    if path.is_dir():
        return sorted(p for p in path.rglob(f"*{PARQUET_SUFFIX}") if p.is_file()), path
    if path.is_file():
        return [path], path.parent
    raise SourceError(f"{path}: no such file or directory")


def _open(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{file}: not a readable Parquet file: {exc}") from exc


def row_count(path: Path) -> int:
    files, _ = parquet_files(path)
    return sum(_open(file).metadata.num_rows for file in files)


def model_id(path: Path) -> str:
    """The producer's model id from the schema metadata of the first file ("" if none)."""
    files, _ = parquet_files(path)
    if not files:
        return ""
    metadata = _open(files[0]).schema_arrow.metadata or {}
    return bytes(metadata.get(MODEL_ID_KEY, b"")).decode()


def parquet_rows(path: Path, caption_field: str | None = None) -> Iterator[ParquetRow | RowError]:
    """Every row of the source; a row whose metadata is not JSON comes as its RowError.
    Raises SourceError when a file cannot be read or lacks the caption column."""
    files, base = parquet_files(path)
    for file in files:
        parquet = _open(file)
        columns = parquet.schema_arrow.names
        if caption_field is not None and caption_field not in columns:
            raise SourceError(
                f"{file}: no column {caption_field!r} (columns: {', '.join(columns)})"
            )
        line = 0
        for batch in parquet.iter_batches():
            vectors = {name: _vectors(batch, name, file) for name in VECTOR_COLUMNS}
            scalars = batch.select([n for n in batch.schema.names if n not in VECTOR_COLUMNS])
            for i, record in enumerate(scalars.to_pylist()):
                line += 1
                where = f"{file}:{line}"
                try:
                    parsed = _parsed_metadata(record, where)
                except RowError as exc:
                    yield exc
                    continue
                yield ParquetRow(
                    where, parsed, base, vectors[IMAGE_VECTOR][i], vectors[CAPTION_VECTOR][i]
                )


def parquet_items(path: Path, caption_field: str | None = None) -> Iterator[IngestItem]:
    """The items of a Parquet source; a row that cannot describe an item raises its RowError
    and the next call goes on with the next row."""
    return _Items(parquet_rows(path, caption_field), caption_field)


class _Items(Iterator[IngestItem]):
    def __init__(self, rows: Iterator[ParquetRow | RowError], caption_field: str | None) -> None:
        self._rows = rows
        self._caption_field = caption_field

    def __iter__(self) -> _Items:
        return self

    def __next__(self) -> IngestItem:
        row = next(self._rows)
        if isinstance(row, RowError):
            raise row
        return row_to_item(row, self._caption_field)


def row_to_item(row: ParquetRow, caption_field: str | None = None) -> IngestItem:
    """An item carrying the row's vectors; a row without an image vector names its image."""
    if row.image_vector is None:
        item = row_item(row.record, row.base, caption_field, row.where)
        return (
            item if row.caption_vector is None else replace(item, caption_vector=row.caption_vector)
        )
    caption_key = caption_field or DEFAULT_CAPTION_FIELD
    caption = row.record.get(caption_key)
    return IngestItem(
        id=_text(row.record.get("id")),
        uri=_text(row.record.get("uri")),
        caption="" if caption is None else str(caption),
        metadata=row_metadata(row.record, caption_key, row.where),
        image_vector=row.image_vector,
        caption_vector=row.caption_vector,
    )


def _vectors(batch: pa.RecordBatch, name: str, file: Path) -> list[np.ndarray | None]:
    """One column of vectors as float32 views of one buffer; None for a null cell."""
    if name not in batch.schema.names:
        return [None] * batch.num_rows
    column = batch.column(name)
    kind = column.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        column = column.cast(pa.list_(kind.value_type))
    elif not pa.types.is_list(column.type):
        raise SourceError(f"{file}: column {name!r} is {kind}, not a list of floats")
    value_type = column.type.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise SourceError(f"{file}: column {name!r} holds {value_type}, not floats")
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    return [None if nulls[i] else values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def _parsed_metadata(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A row whose `metadata` JSON string is parsed (row_item wants an object)."""
    raw = record.get("metadata")
    if not isinstance(raw, str) or not raw:
        return record
    try:
        return {**record, "metadata": json.loads(raw)}
    except json.JSONDecodeError as exc:
        raise RowError(where, f"metadata is not valid JSON: {exc.msg}") from None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()
