"""Bytes and strings in, normalized vectors out: preprocessing, batching, inference.

The pipeline owns the model-specific preprocessing (the bundle's text tokenizer and image
preprocessor) and hands tensors to an `InferenceBackend`, which only runs the towers:
`OnnxEncoder` in production, `FakeBackend` (deterministic vectors) in fast tests.

Images are decoded and resized in a thread pool, so decoding overlaps the inference of
earlier batches. Texts are checked against `max_text_bytes`, then tokenized in a pool of
their own, never on the event loop: BPE on a text at the cap takes tens of milliseconds
(the Rust tokenizer releases the GIL), and a long text must not hold up other calls. A
request's texts go in chunks of about TOKENIZE_CHUNK_CHARS, one after another, so a large
request shares the pool with small ones instead of queueing all its work ahead of theirs.
Both then go through their tower's Batcher, which sees a text only once it is tokenized.
Each call reports where its time went.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from clipsearch.server.batcher import Batcher, BatchResult, MicroBatcher, Priority
from clipsearch.server.errors import ClipsearchError, ImageError
from clipsearch.server.images import ImageLimits, ImagePreprocessor
from clipsearch.server.store.validation import check_text_bytes
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


TOKENIZE_CHUNK_CHARS = 16384
PREPROCESS_CHUNK = 8  # images per pool call when a group is split across the pool's threads
DEFAULT_MAX_TEXT_BYTES = 16384


def _chunks(texts: Sequence[str], chars: int = TOKENIZE_CHUNK_CHARS) -> Iterator[list[str]]:
    """`texts` in order, in runs of about `chars` characters (at least one text each)."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        if chunk and size + len(text) > chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(text)
        size += len(text)
    if chunk:
        yield chunk


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
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        prioritize: bool = True,
    ) -> None:
        self.backend = backend
        self.max_text_bytes = max_text_bytes
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
            prioritize=prioritize,
        )
        self.vision_batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            "vision",
            self._run_vision,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            workers=workers,
            bulk_max_wait_ms=bulk_max_wait_ms,
            prioritize=prioritize,
        )
        threads = preprocess_threads or min(8, os.cpu_count() or 1)
        self.preprocess_threads = threads
        self._preprocess_pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
        self._tokenize_pool = ThreadPoolExecutor(
            min(4, os.cpu_count() or 1), thread_name_prefix="tokenize"
        )

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
            max_text_bytes=settings.max_text_bytes,
            prioritize=settings.priority_queue,
        )

    @property
    def batchers(self) -> dict[str, MicroBatcher[Any, np.ndarray]]:
        """The tower batchers by tower name."""
        return {"text": self.text_batcher, "vision": self.vision_batcher}

    async def start(self) -> None:
        await self.text_batcher.start()
        await self.vision_batcher.start()

    async def close(self) -> None:
        await self.text_batcher.close()
        await self.vision_batcher.close()
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # --- batch functions (worker threads) ------------------------------------------------

    def _run_text(self, items: list[TokenizedText]) -> list[np.ndarray]:
        return list(self.backend.run_text(self.tokenizer.pad(items)))

    def _run_vision(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.backend.run_vision(np.stack(pixels)))

    # --- texts ---------------------------------------------------------------------------

    def check_texts(self, texts: Sequence[str], names: Sequence[str] = ()) -> None:
        """Every text within `max_text_bytes`; `names` (default "text i", or "the text"
        for one) name them in the error."""
        for index, text in enumerate(texts):
            if len(text) * 4 <= self.max_text_bytes:
                continue
            what = names[index] if names else f"text {index}" if len(texts) > 1 else "the text"
            check_text_bytes(text, self.max_text_bytes, what, "max_text_bytes")

    async def encode_texts(
        self,
        texts: Sequence[str],
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> Encoded:
        started = time.perf_counter()
        self.check_texts(texts)
        loop = asyncio.get_running_loop()
        tokens: list[TokenizedText] = []
        for chunk in _chunks(texts):
            tokenize = functools.partial(self.tokenizer.tokenize, chunk)
            tokens += await loop.run_in_executor(self._tokenize_pool, tokenize)
        preprocess_us = int((time.perf_counter() - started) * 1e6)
        results = await self.text_batcher.submit(tokens, priority, deadline)
        vectors, timing = _collect(results, self.dim)
        return Encoded(
            vectors,
            tuple(t.truncated for t in tokens),
            StageTiming(timing.queue_us, preprocess_us, timing.inference_us, timing.batch_size),
        )

    async def tokenize_each(
        self, texts: Sequence[str]
    ) -> tuple[list[TokenizedText | ClipsearchError], int]:
        """Each text checked, then the valid ones tokenized in one pool call per chunk: per
        text its tokens or its own error, and the microseconds taken."""
        started = time.perf_counter()
        errors: dict[int, ClipsearchError] = {}
        for index, text in enumerate(texts):
            try:
                self.check_texts([text])
            except ClipsearchError as exc:
                errors[index] = exc
        loop = asyncio.get_running_loop()
        tokens: list[TokenizedText] = []
        for chunk in _chunks([t for i, t in enumerate(texts) if i not in errors]):
            tokenize = functools.partial(self.tokenizer.tokenize, chunk)
            tokens += await loop.run_in_executor(self._tokenize_pool, tokenize)
        valid = iter(tokens)
        results = [errors[i] if i in errors else next(valid) for i in range(len(texts))]
        return results, int((time.perf_counter() - started) * 1e6)

    # --- images --------------------------------------------------------------------------

    async def preprocess_images_each(
        self, images: Sequence[bytes]
    ) -> list[tuple[np.ndarray, int] | ClipsearchError]:
        """Decode and resize several images in a few pool calls (one per pool thread, at
        least PREPROCESS_CHUNK images each): per image its pixels and microseconds taken, or
        its own error."""
        loop = asyncio.get_running_loop()

        def work(chunk: Sequence[bytes]) -> list[tuple[np.ndarray, int] | ClipsearchError]:
            done: list[tuple[np.ndarray, int] | ClipsearchError] = []
            for data in chunk:
                started = time.perf_counter()
                try:
                    pixels = self.preprocessor(data)
                except ClipsearchError as exc:
                    done.append(exc)
                    continue
                done.append((pixels, int((time.perf_counter() - started) * 1e6)))
            return done

        if not images:
            return []
        parts = max(1, min(self.preprocess_threads, len(images) // PREPROCESS_CHUNK))
        size = -(-len(images) // parts)
        chunks = [images[i : i + size] for i in range(0, len(images), size)]
        if len(chunks) == 1:
            return await loop.run_in_executor(self._preprocess_pool, work, chunks[0])
        done = await asyncio.gather(
            *(loop.run_in_executor(self._preprocess_pool, work, chunk) for chunk in chunks)
        )
        return [result for part in done for result in part]

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
