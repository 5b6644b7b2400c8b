"""A deterministic stand-in for the ONNX towers, for tests of everything above the encoder.

Each row's vector is a pure function of its input row (hash-seeded), so a batch result can be
compared with single results exactly. Delays and failures can be injected per call.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import numpy as np

from clipsearch.server.vectors import l2_normalize


def hash_vector(data: bytes, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeEncoder:
    def __init__(
        self,
        dim: int = 16,
        delay_s: float = 0.0,
        fail_when: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        self._dim = dim
        self.delay_s = delay_s
        self.fail_when = fail_when
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self._dim

    def _encode(self, batch: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
        with self._lock:
            self.batch_sizes.append(len(rows))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when(batch):
            raise RuntimeError("injected inference failure")
        return l2_normalize(np.stack([hash_vector(row.tobytes(), self._dim) for row in rows]))

    def run_text(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids = feeds["input_ids"]
        # Padding must not change a row's vector: hash the ids up to and including the first
        # occurrence of the row's maximum (EOS is the largest id in CLIP vocabularies).
        return self._encode(ids, [row[: int(np.argmax(row)) + 1] for row in ids])

    def run_vision(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixel_values, dtype=np.float32)
        return self._encode(pixels, list(pixels))
