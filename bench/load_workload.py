"""What `clipsearch bench load` sends: the scenarios, their payloads, and one call of each.

Payloads are made once, before any step, and deterministically from the seed: texts from a
fixed list, JPEGs rendered from demo scenes at a chosen size, unit vectors of the model's
dimension. A call never raises: it returns the status code name ("OK" or e.g. "NOT_FOUND")
and the server's Timing, so the engine only counts.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipsearch.client.aio import AsyncClient
from clipsearch.client.errors import ClipsearchError
from clipsearch.client.types import IngestItem, Timing

SCENARIOS = (
    "encode-text",
    "encode-image",
    "search-text",
    "search-image",
    "search-vector",
    "ingest",
)
# Not offered on the command line: the cheapest RPC, for the load generator's own ceiling.
TRIVIAL = "info"
IMAGE_SCENARIOS = frozenset({"encode-image", "search-image", "ingest"})
QUERIES = ("a red circle", "红色的圆形", "blue square", "a yellow star", "绿色的三角形", "purple")
DISTINCT_IMAGES = 16
OK = "OK"


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """ "search-text=3,ingest=1" -> (("search-text", 3.0), ("ingest", 1.0)); a bare name
    weighs 1."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"the weight of {name} is not a number: {weight!r}") from None
        if value <= 0:
            raise ValueError(f"the weight of {name} must be > 0, got {weight}")
        weights[name] = weights.get(name, 0.0) + value
    if not weights:
        raise ValueError(f"no scenario in mix {text!r}")
    return tuple(weights.items())


def render_jpegs(count: int, size: int, seed: int) -> list[bytes]:
    """`count` distinct JPEG scenes of size x size pixels, the same for the same seed."""
    # Imported here: Pillow is needed only by the image scenarios.
    from clipsearch.export import demo_data  # noqa: PLC0415

    scenes = [demo_data.sample_scene(demo_data.scene_rng(seed, i)) for i in range(count)]
    return [demo_data.encode_jpeg(demo_data.render_scene(scene, size)) for scene in scenes]


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


@dataclass(frozen=True)
class Payloads:
    texts: Sequence[str]
    images: Sequence[bytes]
    vectors: np.ndarray

    @classmethod
    def build(cls, scenarios: Sequence[str], *, dim: int, image_size: int, seed: int) -> Payloads:
        """Only what the scenarios use: rendering JPEGs needs Pillow."""
        images = (
            render_jpegs(DISTINCT_IMAGES, image_size, seed)
            if IMAGE_SCENARIOS.intersection(scenarios)
            else []
        )
        vectors = (
            unit_vectors(DISTINCT_IMAGES, dim, seed)
            if "search-vector" in scenarios
            else np.zeros((0, dim), np.float32)
        )
        return cls(QUERIES, images, vectors)

    @property
    def mean_image_bytes(self) -> float:
        return sum(map(len, self.images)) / len(self.images) if self.images else 0.0


@dataclass(frozen=True)
class Outcome:
    code: str
    timing: Timing | None


class Workload:
    """Picks each request's scenario by weight (seeded) and makes the call."""

    def __init__(
        self,
        client: AsyncClient,
        mix: Sequence[tuple[str, float]],
        payloads: Payloads,
        *,
        collection: str | None,
        top_k: int,
        ingest_items: int,
        seed: int,
        id_prefix: str = "",
    ) -> None:
        self.client = client
        self.names = [name for name, _ in mix]
        self.weights = [weight for _, weight in mix]
        self.payloads = payloads
        self.collection = collection
        self.top_k = top_k
        self.ingest_items = ingest_items
        self._rng = random.Random(seed)
        self._counter = itertools.count()
        self._id_prefix = id_prefix or f"bench-load-{os.getpid()}-{random.getrandbits(32):08x}"

    def pick(self) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self._rng.choices(self.names, self.weights)[0]

    async def call(self, scenario: str) -> Outcome:
        n = next(self._counter)
        try:
            return await self._call(scenario, n)
        except ClipsearchError as exc:
            return Outcome(exc.code_name, None)

    async def _call(self, scenario: str, n: int) -> Outcome:
        client, p = self.client, self.payloads
        text = p.texts[n % len(p.texts)]
        image = p.images[n % len(p.images)] if p.images else b""
        search = functools.partial(client.search, top_k=self.top_k, collection=self.collection)
        if scenario == "encode-text":
            timing = (await client.encode_texts([text])).timing
        elif scenario == "encode-image":
            timing = (await client.encode_images([image])).timing
        elif scenario == "search-text":
            timing = (await search(text)).timing
        elif scenario == "search-image":
            timing = (await search(image=image)).timing
        elif scenario == "search-vector":
            timing = (await search(vector=p.vectors[n % len(p.vectors)])).timing
        elif scenario == "ingest":
            return await self._ingest(n)
        elif scenario == TRIVIAL:
            timing = (await client.info()).timing
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        return Outcome(OK, timing)

    async def _ingest(self, n: int) -> Outcome:
        p = self.payloads
        items = [
            IngestItem(
                id=f"{self._id_prefix}-{n}-{k}",
                image=p.images[(n + k) % len(p.images)],
                caption=p.texts[(n + k) % len(p.texts)],
            )
            for k in range(self.ingest_items)
        ]
        # One attempt: a load test reports a broken stream, it does not hide it by resuming.
        stream = self.client.ingest(items, collection=self.collection, max_attempts=1)
        code, timings = OK, []
        async for result in stream:
            if result.ok:
                timings.append(result.timing)
            elif code == OK:
                code = result.error_code or "UNKNOWN"
        return Outcome(code, mean_timing(timings) if timings else None)


def mean_timing(timings: Sequence[Timing]) -> Timing:
    """The per-item timings of one ingest request, averaged into one."""
    n = len(timings)
    return Timing(
        queue_us=sum(t.queue_us for t in timings) // n,
        preprocess_us=sum(t.preprocess_us for t in timings) // n,
        inference_us=sum(t.inference_us for t in timings) // n,
        search_us=sum(t.search_us for t in timings) // n,
        total_us=sum(t.total_us for t in timings) // n,
        batch_size=round(sum(t.batch_size for t in timings) / n),
    )
