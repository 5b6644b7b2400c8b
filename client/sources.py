"""Where ingest items come from: a directory of images, a CSV or a JSONL manifest, Parquet.

- A directory: every file under it (recursively, hidden ones skipped) whose extension is an
  image extension, in sorted order; id = the path relative to the directory in POSIX form,
  uri = the absolute path. Re-ingesting the directory upserts the same ids.
- A CSV or JSONL manifest, one item per row: `id` (optional: empty = the server hashes the
  image), `path` or `uri` (the image file; relative paths are resolved against the manifest's
  directory; `file://` URIs work; `uri` is stored as given, else the absolute path),
  the caption column (`caption`, or the one named by `caption_field`, e.g. the demo gallery's
  `caption_en`), and every other column goes into the item's metadata. CSV cells that are
  integers or decimals become JSON numbers; JSONL values keep their JSON types, and a
  `metadata` object is merged in.

- Parquet (a `.parquet` file or a directory of them): the manifest's columns, and items that
  carry vectors computed elsewhere (`image_vector`, `caption_vector`); see
  `clipsearch.client.parquet` (needs pyarrow).

A row that cannot describe an item (not JSON, no path, a remote URI) raises `RowError` for
that row alone and iteration goes on with the next one, so an ingest reports the row as a
failed item (named `manifest:line`) and carries on.

Images are read only when an item is sent (`IngestItem.path`), so a manifest of millions of
rows costs no memory up front.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from clipsearch.client.types import IngestItem

PARQUET_SUFFIX = ".parquet"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_SUFFIXES = frozenset({".csv"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
DEFAULT_CAPTION_FIELD = "caption"
RESERVED_FIELDS = frozenset({"id", "path", "uri", "metadata"})

_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+")

SourceKind = Literal["directory", "csv", "jsonl", "image", "parquet"]


class SourceError(ValueError):
    """A manifest row (or the path itself) cannot describe an item."""


class RowError(SourceError):
    """One manifest row cannot describe an item; the rows after it can still be read.

    Iterating a manifest raises it for the bad row alone: the next `next()` goes on with the
    row after it, so an ingest reports the row as a failed item and carries on.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class ItemSource:
    """The items of a path; iterable several times, `total` counted up front."""

    path: Path
    kind: SourceKind
    caption_field: str | None = None
    extensions: frozenset[str] = IMAGE_EXTENSIONS
    _total: int | None = field(default=None, init=False, repr=False)

    def __iter__(self) -> Iterator[IngestItem]:
        if self.kind == "directory":
            return directory_items(self.path, self.extensions)
        if self.kind == "csv":
            return csv_items(self.path, self.caption_field)
        if self.kind == "jsonl":
            return jsonl_items(self.path, self.caption_field)
        if self.kind == "parquet":
            from clipsearch.client import parquet  # noqa: PLC0415  # needs pyarrow, an extra

            return parquet.parquet_items(self.path, self.caption_field)
        return iter([image_item(self.path, self.path.parent)])

    @property
    def model_id(self) -> str:
        """The model id a Parquet source's producer recorded ("" for other sources)."""
        if self.kind != "parquet":
            return ""
        from clipsearch.client import parquet  # noqa: PLC0415  # needs pyarrow, an extra

        return parquet.model_id(self.path)

    @property
    def total(self) -> int:
        """How many items (files or rows) the source has."""
        if self._total is None:
            self._total = self._count()
        return self._total

    def _count(self) -> int:
        if self.kind == "directory":
            return len(image_files(self.path, self.extensions))
        if self.kind == "csv":
            with self.path.open(encoding="utf-8", newline="") as f:
                return sum(1 for _ in csv.DictReader(f))
        if self.kind == "jsonl":
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        if self.kind == "parquet":
            from clipsearch.client import parquet  # noqa: PLC0415  # needs pyarrow, an extra

            return parquet.row_count(self.path)
        return 1


def open_source(
    path: str | os.PathLike[str],
    *,
    caption_field: str | None = None,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> ItemSource:
    """The item source for a directory, a .csv, a .jsonl/.ndjson, Parquet (a .parquet file or
    a directory named *.parquet), or a single image file."""
    path = Path(path)
    if path.suffix.lower() == PARQUET_SUFFIX and path.exists():
        _require_pyarrow()
        return ItemSource(path, "parquet", caption_field)
    if path.is_dir():
        if caption_field is not None:
            raise SourceError("--caption-field applies to CSV/JSONL manifests, not directories")
        return ItemSource(path, "directory", extensions=extensions)
    if not path.is_file():
        raise SourceError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return ItemSource(path, "csv", caption_field)
    if suffix in JSONL_SUFFIXES:
        return ItemSource(path, "jsonl", caption_field)
    if suffix in extensions:
        return ItemSource(path, "image", extensions=extensions)
    raise SourceError(
        f"{path}: not a directory, a CSV (.csv), JSONL (.jsonl) or Parquet (.parquet) "
        "manifest, or an image"
    )


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401, PLC0415
    except ImportError:
        raise SourceError(
            "reading Parquet needs pyarrow: pip install 'clipsearch[parquet]'"
        ) from None


# --- directories ---------------------------------------------------------------------------


def image_files(root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under `root`, recursively, hidden files and folders skipped, sorted."""
    found = []
    for file in root.rglob("*"):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.suffix.lower() in extensions and file.is_file():
            found.append(relative)
    return [root / relative for relative in sorted(found, key=lambda p: p.as_posix())]


def directory_items(
    root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS
) -> Iterator[IngestItem]:
    for file in image_files(root, extensions):
        yield image_item(file, root)


def image_item(file: Path, root: Path) -> IngestItem:
    absolute = file.resolve()
    return IngestItem(id=file.relative_to(root).as_posix(), path=absolute, uri=absolute.as_posix())


# --- manifests ---------------------------------------------------------------------------


class _Rows(Iterator[IngestItem]):
    """Items of manifest rows, where a row that cannot describe an item raises its RowError
    and the next call goes on (a generator is finished once it raises)."""

    def __init__(self, rows: Iterator[IngestItem | RowError]) -> None:
        self._rows = rows

    def __iter__(self) -> _Rows:
        return self

    def __next__(self) -> IngestItem:
        row = next(self._rows)
        if isinstance(row, RowError):
            raise row
        return row


def csv_items(path: Path, caption_field: str | None = None) -> Iterator[IngestItem]:
    return _Rows(_csv_rows(path, caption_field))


def _csv_rows(path: Path, caption_field: str | None) -> Iterator[IngestItem | RowError]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        _check_caption_field(reader.fieldnames or [], caption_field, path)
        for line, row in enumerate(reader, start=2):
            values = {k: _csv_value(v) for k, v in row.items() if k is not None}
            try:
                yield row_item(values, path.parent, caption_field, f"{path}:{line}")
            except RowError as exc:
                yield exc


def jsonl_items(path: Path, caption_field: str | None = None) -> Iterator[IngestItem]:
    return _Rows(_jsonl_rows(path, caption_field))


def _jsonl_rows(path: Path, caption_field: str | None) -> Iterator[IngestItem | RowError]:
    with path.open("rb") as f:  # decoded line by line: one bad line is one failed item
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield _jsonl_item(line, path.parent, caption_field, f"{path}:{line_number}")
            except RowError as exc:
                yield exc


def _jsonl_item(line: bytes, base: Path, caption_field: str | None, where: str) -> IngestItem:
    try:
        row = json.loads(line.decode("utf-8").rstrip("\r\n"))
    except UnicodeDecodeError as exc:
        raise RowError(where, f"not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RowError(where, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(row, dict):
        raise RowError(where, "each line must be a JSON object")
    if caption_field is not None and caption_field not in row:
        raise RowError(where, f"no {caption_field!r} field")
    return row_item(row, base, caption_field, where)


def row_item(
    row: Mapping[str, Any], base: Path, caption_field: str | None, where: str
) -> IngestItem:
    """An item from one manifest row (see the module docstring for the columns)."""
    caption_key = caption_field or DEFAULT_CAPTION_FIELD
    location = _text(row.get("path")) or _text(row.get("uri"))
    if not location:
        raise RowError(where, "the row has neither a path nor a uri")
    file = _local_file(location, base, where)
    caption = row.get(caption_key)
    return IngestItem(
        id=_text(row.get("id")),
        path=file,
        uri=_text(row.get("uri")) or file.as_posix(),
        caption="" if caption is None else str(caption),
        metadata=row_metadata(row, caption_key, where),
    )


def row_metadata(row: Mapping[str, Any], caption_key: str, where: str) -> dict[str, Any]:
    """A row's `metadata` object merged with every column that is not a reserved one."""
    metadata: dict[str, Any] = {}
    nested = row.get("metadata")
    if isinstance(nested, dict):
        metadata.update(nested)
    elif nested not in (None, ""):
        raise RowError(where, "metadata must be a JSON object")
    for key, value in row.items():
        if key not in RESERVED_FIELDS and key != caption_key:
            metadata[key] = value
    return metadata


def _local_file(location: str, base: Path, where: str) -> Path:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        location = unquote(parsed.path)
    elif len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise RowError(
            where,
            f"{location!r} is a remote URI; the client reads local files only "
            "(give a path column, or download the images first)",
        )
    file = Path(location)
    return (file if file.is_absolute() else base / file).resolve()


def _check_caption_field(columns: Sequence[str], caption_field: str | None, path: Path) -> None:
    if caption_field is not None and caption_field not in columns:
        raise SourceError(
            f"{path}: no column {caption_field!r} (columns: {', '.join(columns) or 'none'})"
        )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _csv_value(value: str | None) -> Any:
    if value is None:
        return ""
    if _INTEGER.fullmatch(value):
        return int(value)
    if _DECIMAL.fullmatch(value):
        return float(value)
    return value
