"""Bytes and strings in, normalized vectors out: preprocessing, batching, inference.

The pipeline owns the model-specific preprocessing (the bundle's text tokenizer and image
preprocessor) and hands tensors to an `InferenceBackend`, which only runs the towers:
`OnnxEncoder` in production, `FakeBackend` (deterministic vectors) in fast tests.

Images are decoded and resized in a thread pool, so decoding overlaps the inference of
earlier batches; texts are tokenized inline (the Rust tokenizer takes microseconds). Both
then go through their tower's Batcher. Each call reports where its time went.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from clipsearch.server.batcher import Batcher, BatchResult, Priority
from clipsearch.server.errors import ImageError
from clipsearch.server.images import ImageLimits, ImagePreprocessor
from clipsearch.server.text import TextTokenizer, TokenizedText

if TYPE_CHECKING:
    from clipsearch.server.bundle import Bundle
    from clipsearch.server.settings import Settings


class InferenceBackend(Protocol):
    """The towers of a model: tensors in, L2-normalized float32 vectors [batch, dim] out.

    Called from the batchers' worker threads, one batch per call; an exception fails exactly
    that batch's items."""

    @property
    def dim(self) -> int: ...

    def run_text(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One padded batch of token ids (`TextTokenizer.pad`'s feeds)."""
        ...

    def run_vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed images [batch, 3, S, S] (`ImagePreprocessor`'s output, stacked)."""
        ...


@dataclass(frozen=True)
class StageTiming:
    """Microseconds per stage; for several items, the slowest item's figures."""

    queue_us: int = 0
    preprocess_us: int = 0
    inference_us: int = 0
    batch_size: int = 0

    def combine(self, other: StageTiming) -> StageTiming:
        return StageTiming(
            max(self.queue_us, other.queue_us),
            max(self.preprocess_us, other.preprocess_us),
            max(self.inference_us, other.inference_us),
            max(self.batch_size, other.batch_size),
        )


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # [n, dim] float32, L2-normalized
    truncated: tuple[bool, ...]
    timing: StageTiming


def _collect(
    results: Sequence[BatchResult[np.ndarray]], dim: int
) -> tuple[np.ndarray, StageTiming]:
    if not results:
        return np.zeros((0, dim), np.float32), StageTiming()
    vectors = np.stack([r.value for r in results])
    timing = StageTiming(
        queue_us=max(r.timing.queue_us for r in results),
        inference_us=max(r.timing.inference_us for r in results),
        batch_size=max(r.timing.batch_size for r in results),
    )
    return vectors, timing


class EncodingPipeline:
    def __init__(
        self,
        backend: InferenceBackend,
        tokenizer: TextTokenizer,
        preprocessor: ImagePreprocessor,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        workers: int = 1,
        bulk_max_wait_ms: float = 500.0,
        preprocess_threads: int = 0,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.dim = backend.dim
        self.text_batcher: Batcher[TokenizedText, np.ndarray] = Batcher(
            "text",
            self._run_text,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            workers=workers,
            bulk_max_wait_ms=bulk_max_wait_ms,
        )
        self.vision_batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            "vision",
            self._run_vision,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            workers=workers,
            bulk_max_wait_ms=bulk_max_wait_ms,
        )
        threads = preprocess_threads or min(8, os.cpu_count() or 1)
        self._preprocess_pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess")

    @classmethod
    def from_settings(
        cls, backend: InferenceBackend, bundle: Bundle, settings: Settings
    ) -> EncodingPipeline:
        """`backend` behind the tokenizer and image preprocessor of `bundle`."""
        preprocessor = ImagePreprocessor.from_bundle(
            bundle,
            limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
            fast_jpeg=settings.fast_jpeg,
        )
        return cls(
            backend,
            TextTokenizer.from_bundle(bundle),
            preprocessor,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            workers=settings.inference_workers,
            bulk_max_wait_ms=settings.bulk_max_wait_ms,
            preprocess_threads=settings.preprocess_threads,
        )

    async def start(self) -> None:
        await self.text_batcher.start()
        await self.vision_batcher.start()

    async def close(self) -> None:
        await self.text_batcher.close()
        await self.vision_batcher.close()
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

    # --- batch functions (worker threads) ------------------------------------------------

    def _run_text(self, items: list[TokenizedText]) -> list[np.ndarray]:
        return list(self.backend.run_text(self.tokenizer.pad(items)))

    def _run_vision(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.backend.run_vision(np.stack(pixels)))

    # --- texts ---------------------------------------------------------------------------

    async def encode_texts(
        self,
        texts: Sequence[str],
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> Encoded:
        started = time.perf_counter()
        tokens = self.tokenizer.tokenize(texts)
        preprocess_us = int((time.perf_counter() - started) * 1e6)
        results = await self.text_batcher.submit(tokens, priority, deadline)
        vectors, timing = _collect(results, self.dim)
        return Encoded(
            vectors,
            tuple(t.truncated for t in tokens),
            StageTiming(timing.queue_us, preprocess_us, timing.inference_us, timing.batch_size),
        )

    # --- images --------------------------------------------------------------------------

    async def preprocess_image(self, data: bytes) -> tuple[np.ndarray, int]:
        """Decode and resize one image in the pool; returns pixels and microseconds taken."""
        loop = asyncio.get_running_loop()

        def work() -> tuple[np.ndarray, int]:
            started = time.perf_counter()
            pixels = self.preprocessor(data)
            return pixels, int((time.perf_counter() - started) * 1e6)

        return await loop.run_in_executor(self._preprocess_pool, work)

    async def encode_pixels(
        self,
        pixels: Sequence[np.ndarray],
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> Encoded:
        results = await self.vision_batcher.submit(pixels, priority, deadline)
        vectors, timing = _collect(results, self.dim)
        return Encoded(vectors, (False,) * len(pixels), timing)

    async def encode_images(
        self,
        images: Sequence[bytes],
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> Encoded:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(self.preprocess_image(data) for data in images), return_exceptions=True
        )
        pixels: list[np.ndarray] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ImageError):
                message = f"image {index}: {outcome}" if len(images) > 1 else str(outcome)
                raise type(outcome)(message) from outcome
            if isinstance(outcome, BaseException):
                raise outcome
            pixels.append(outcome[0])
        preprocess_us = int((time.perf_counter() - started) * 1e6)
        encoded = await self.encode_pixels(pixels, priority, deadline)
        t = encoded.timing
        return Encoded(
            encoded.vectors,
            encoded.truncated,
            StageTiming(t.queue_us, preprocess_us, t.inference_us, t.batch_size),
        )
