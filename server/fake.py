"""A deterministic stand-in for the ONNX towers, for fast tests of everything above them.

`FakeBackend` is an `InferenceBackend`: each row's vector is a pure function of that row's
token ids or pixels (hash-seeded, L2-normalized), so a batch gives exactly the single
results, the same input always gives the same vector, and a test can compute the vector it
expects. Behind the bundle's real tokenizer and image preprocessor it runs the whole service
without ONNX Runtime (see `clipsearch.server.app.fake_components`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence

import numpy as np

from clipsearch.server.bundle import Manifest
from clipsearch.server.vectors import l2_normalize


def hash_vector(data: bytes, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeBackend:
    """Vectors of `dim` from hashes. `eos_id` ends a padded text row (the bundle's EOS);
    `fail_when(batch)` returning True makes that batch raise, as a failing model would."""

    precision = "fake"

    def __init__(
        self,
        dim: int = 16,
        *,
        eos_id: int | None = None,
        fail_when: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        self._dim = dim
        self.eos_id = eos_id
        self.fail_when = fail_when
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    @classmethod
    def for_manifest(
        cls, manifest: Manifest, fail_when: Callable[[np.ndarray], bool] | None = None
    ) -> FakeBackend:
        """A fake with the model's dimension and EOS id."""
        return cls(manifest.dim, eos_id=manifest.text.eos_id, fail_when=fail_when)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def text_providers(self) -> list[str]:
        return [type(self).__name__]

    @property
    def vision_providers(self) -> list[str]:
        return [type(self).__name__]

    def _encode(self, batch: np.ndarray, rows: Sequence[np.ndarray]) -> np.ndarray:
        with self._lock:
            self.batch_sizes.append(len(rows))
        if self.fail_when is not None and self.fail_when(batch):
            raise RuntimeError("injected inference failure")
        return l2_normalize(np.stack([hash_vector(row.tobytes(), self._dim) for row in rows]))

    def _unpadded(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """A padded row's ids, BOS to EOS: padding must not change a text's vector."""
        if mask is not None:
            return ids[: int(mask.sum())]
        if self.eos_id is None:
            raise ValueError("FakeBackend needs eos_id (or an attention mask) to encode texts")
        ends = np.flatnonzero(ids[1:] == self.eos_id)
        return ids[: int(ends[0]) + 2] if ends.size else ids

    def run_text(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.asarray(feeds["input_ids"], dtype=np.int64)
        mask = feeds.get("attention_mask")
        rows = [self._unpadded(row, None if mask is None else mask[n]) for n, row in enumerate(ids)]
        return self._encode(ids, rows)

    def run_vision(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self._encode(pixels, list(pixels))
