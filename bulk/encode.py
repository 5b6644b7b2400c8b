"""The encode stage of a bulk run: one `OnnxEncoder` per Ray actor, a batch of work rows in,
the same rows with their vectors (or their error) out.

The actor runs the server's own code: `load_bundle`, `OnnxEncoder` (the same providers,
precision rule and graph options), its `ImagePreprocessor` (decode limits, EXIF, fast JPEG)
and `TextTokenizer`, and the store's validation rules, with the settings the server would
use (`Settings`). So a vector written by `clipsearch bulk` is the vector `clipsearch ingest`
writes for the same image, and an item the store would refuse fails here, alone, instead of
failing its whole batch's upsert. Items without an id get the server's content hash.

Images are read and decoded in a thread pool (Pillow and ONNX Runtime release the GIL), then
each tower runs once per batch: images, and the captions of the items that have one.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipsearch.bulk.sources import WORK_SCHEMA
from clipsearch.server.bundle import default_bundle_path, load_bundle
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder
from clipsearch.server.errors import ClipsearchError
from clipsearch.server.ingest import content_id
from clipsearch.server.settings import Settings
from clipsearch.server.store import StoredItem, validation

log = logging.getLogger(__name__)

IMAGE_VECTOR = "image_vector"
CAPTION_VECTOR = "caption_vector"


def encoded_schema() -> pa.Schema:
    """The work rows (see `sources.WORK_SCHEMA`) plus their vectors; a failed row has
    `error` set and null vectors, an item without a caption a null caption vector."""
    vector = pa.list_(pa.float32())
    return WORK_SCHEMA.append(pa.field(IMAGE_VECTOR, vector)).append(
        pa.field(CAPTION_VECTOR, vector)
    )


@dataclass
class _Prepared:
    id: str
    pixels: np.ndarray


class EncodeActor:
    """A Ray Data callable class: constructed once per actor, called once per batch."""

    def __init__(self, settings: Settings, decode_threads: int = 2) -> None:
        bundle = load_bundle(settings.model or default_bundle_path())
        options = replace(EncoderOptions.from_settings(settings), warmup=False)
        self.encoder = OnnxEncoder(bundle, options)
        self.dim = self.encoder.dim
        self._pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prepared = list(self._pool.map(self._prepare, rows))
        good = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared)]
        image_vectors: dict[int, np.ndarray] = {}
        caption_vectors: dict[int, np.ndarray] = {}
        if good:
            pixels = np.stack([_pixels(prepared[i]) for i in good])
            try:
                for i, vector in zip(good, self.encoder.run_vision(pixels), strict=True):
                    image_vectors[i] = vector
                captioned = [i for i in good if rows[i]["caption"]]
                if captioned:
                    tokens = self.encoder.tokenizer.tokenize(
                        [rows[i]["caption"] for i in captioned]
                    )
                    vectors = self.encoder.run_text(self.encoder.tokenizer.pad(tokens))
                    caption_vectors.update(zip(captioned, vectors, strict=True))
            except Exception as exc:  # an inference failure fails exactly this batch
                log.exception("inference failed for a batch of %d items", len(good))
                image_vectors.clear()
                caption_vectors.clear()
                for i in good:
                    prepared[i] = f"inference failed: {exc}"
        for i, outcome in enumerate(prepared):
            if isinstance(outcome, _Prepared):
                rows[i]["id"] = outcome.id
            else:
                rows[i]["error"] = outcome
        return _table(rows, image_vectors, caption_vectors, self.dim)

    def _prepare(self, row: dict[str, str]) -> _Prepared | str:
        """The item's id and pixels, or why it failed."""
        if row["error"]:
            return str(row["error"])
        try:
            data = Path(row["path"]).read_bytes()
        except OSError as exc:
            return f"cannot read {row['path']}: {exc.strerror or exc}"
        item_id = row["id"] or content_id(data)
        try:
            metadata = json.loads(row["metadata"])
            validation.check_fields(StoredItem(item_id, row["uri"], row["caption"], metadata))
            return _Prepared(item_id, self.encoder.preprocessor(data))
        except ClipsearchError as exc:
            return str(exc)


def _pixels(prepared: _Prepared | str) -> np.ndarray:
    assert isinstance(prepared, _Prepared)
    return prepared.pixels


def _table(
    rows: list[dict[str, str]],
    image_vectors: dict[int, np.ndarray],
    caption_vectors: dict[int, np.ndarray],
    dim: int,
) -> pa.Table:
    columns = [pa.array([row[name] for row in rows], pa.string()) for name in WORK_SCHEMA.names]
    columns.append(vector_column(image_vectors, len(rows), dim))
    columns.append(vector_column(caption_vectors, len(rows), dim))
    return pa.Table.from_arrays(columns, schema=encoded_schema())


def vector_column(vectors: dict[int, np.ndarray], n: int, dim: int) -> pa.Array:
    """`list<float32>` of n rows: row i is vectors[i], or null where there is none."""
    matrix = np.zeros((n, dim), np.float32)
    for i, vector in vectors.items():
        matrix[i] = vector
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    missing = pa.array([i not in vectors for i in range(n)], pa.bool_())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)), mask=missing)
