"""`clipsearch bench encoder`: the encoder's speed, in ratios measured in one run.

For each model (random-weight ViT-B/32 exported through `clipsearch export`, and the demo
model): torch eager fp32 vs ONNX Runtime fp32 vs int8 (dynamic) vs int8-static, vision and
text, at batch 1 / 8 / 32; int8-static's closeness to fp32 and its batch invariance; the
batcher under 1 / 8 / 32 concurrent single-image requests vs the raw session's best batch;
JPEG bytes -> vectors vs ready tensors -> vectors; the served text path (32 concurrent
single-text requests through tokenizer, batcher and padding) vs the raw session on the same
padded-to-longest batches of 32, with where the time between them goes. Shared machines are
noisy, so the figures that matter are ratios between runs made side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel

from clipsearch.export.demo_data import generate_gallery
from clipsearch.export.exporter import export_bundle
from clipsearch.export.parity import batch_invariance_cosine, invariance_texts
from clipsearch.export.tokenizers import make_random_clip_checkpoint
from clipsearch.server.batcher import Batcher, Priority
from clipsearch.server.bundle import Bundle, default_bundle_path, load_bundle
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder
from clipsearch.server.pipeline import EncodingPipeline

BATCH_SIZES = (1, 8, 32)
CONCURRENCY = (1, 8, 32)
QUERIES = (
    "a photo of a dog",
    "a red car parked on a quiet street at night",
    "two people walking on the beach",
    "a bowl of noodles with chopsticks",
    "红色的圆形",
    "a diagram of a neural network with many layers and arrows",
    "sunset",
    "an orange cat sleeping on a laptop keyboard",
)
TARGETS = {
    "ort_fp32_vs_torch_b1": 1.2,
    "ort_int8_vs_torch_b32": 3.5,
    "int8_min_cosine": 0.99,
    # 2.5 is the goal on CPUs with AVX-512 VNNI; AVX2-only CPUs top out near 2 (BENCHMARKS.md).
    "int8_static_vs_fp32_b32": 2.5,
    "int8_static_min_cosine": 0.99,
    "int8_static_batch_invariance": 0.99999,
    "batcher_vs_raw_c32": 0.9,
    "text_batcher_vs_raw_c32": 0.9,
    "jpeg_vs_tensor": 0.9,
}
PRECISIONS = ("fp32", "int8", "int8-static")
TEXT_ROUNDS = 5


@dataclass
class ModelReport:
    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)


def measure(fn: Callable[[], object], items: int, min_seconds: float) -> tuple[float, float]:
    """items/s and median ms per call, after one warm-up call."""
    fn()
    times: list[float] = []
    spent = 0.0
    while spent < min_seconds or len(times) < 3:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        spent += times[-1]
    median = statistics.median(times)
    return items / median, median * 1000


def synthetic_photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG with photo-like content (gradients, shapes, noise), the cost of a real one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 100 * np.sin(x / (37 + 11 * c) + seed) * np.cos(y / (53 + 7 * c)) for c in range(3)],
        axis=-1,
    )
    noisy = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def ensure_vitb32(work_dir: Path) -> tuple[Path, Path]:
    """Random-weight ViT-B/32 as an HF checkpoint and as a bundle (every CPU variant), cached."""
    checkpoint = work_dir / "vit-b-32-random"
    bundle = work_dir / "vit-b-32-random-bundle"
    if not (checkpoint / "config.json").exists():
        print(
            f"bench: creating a random-weight ViT-B/32 checkpoint in {checkpoint}", file=sys.stderr
        )
        make_random_clip_checkpoint(checkpoint)
    have = load_bundle(bundle).manifest.variants if (bundle / "manifest.json").exists() else {}
    if set(PRECISIONS) - set(have):
        print(f"bench: exporting it with clipsearch export {PRECISIONS}", file=sys.stderr)
        export_bundle(checkpoint, bundle, PRECISIONS, name="vit-b-32-random")
    return checkpoint, bundle


def torch_towers(
    checkpoint: Path,
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    model = CLIPModel.from_pretrained(checkpoint).eval()  # type: ignore[no-untyped-call]

    def vision(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        return np.asarray(getattr(out, "pooler_output", out))

    def text(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model.get_text_features(input_ids=torch.from_numpy(ids))
        return np.asarray(getattr(out, "pooler_output", out))

    return vision, text


def bench_model(
    name: str,
    bundle: Bundle,
    checkpoint: Path | None,
    *,
    seconds: float,
    pipeline_items: int,
    work_dir: Path,
) -> ModelReport:
    report = ModelReport(name)
    size = bundle.manifest.vision.image_size
    rng = np.random.default_rng(0)
    encoders = {
        precision: OnnxEncoder(bundle, EncoderOptions(precision=precision, warmup=False))
        for precision in PRECISIONS
        if precision in bundle.manifest.variants
    }
    fp32 = encoders["fp32"]
    torch_vision = torch_text = None
    if checkpoint is not None:
        torch_vision, torch_text = torch_towers(checkpoint)

    rates: dict[tuple[str, str, int], float] = {}
    for batch in BATCH_SIZES:
        pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        texts = [QUERIES[i % len(QUERIES)] for i in range(batch)]
        feeds = fp32.tokenizer.pad(fp32.tokenizer.tokenize(texts))
        runners: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
        if torch_vision is not None and torch_text is not None:
            runners["torch fp32"] = (
                functools.partial(torch_vision, pixels),
                functools.partial(torch_text, feeds["input_ids"]),
            )
        for precision, encoder in encoders.items():
            runners[f"ort {precision}"] = (
                functools.partial(encoder.run_vision, pixels),
                functools.partial(encoder.run_text, feeds),
            )
        for runner, (vision, text) in runners.items():
            for tower, fn in (("vision", vision), ("text", text)):
                per_s, ms = measure(fn, batch, seconds)
                rates[(runner, tower, batch)] = per_s
                report.rows.append(
                    {
                        "runner": runner,
                        "tower": tower,
                        "batch": batch,
                        "items_per_s": per_s,
                        "ms": ms,
                    }
                )
                print(
                    f"  {name:>18} {runner:>10} {tower:>6} b{batch:<3} {per_s:8.1f}/s {ms:8.2f} ms",
                    file=sys.stderr,
                )

    if checkpoint is not None:
        report.ratios["ort_fp32_vs_torch_b1"] = min(
            rates[("ort fp32", t, 1)] / rates[("torch fp32", t, 1)] for t in ("vision", "text")
        )
        if "int8" in encoders:
            report.ratios["ort_int8_vs_torch_b32"] = min(
                rates[("ort int8", t, 32)] / rates[("torch fp32", t, 32)]
                for t in ("vision", "text")
            )
    if "int8" in encoders:
        report.ratios["int8_min_cosine"] = int8_min_cosine(encoders["fp32"], encoders["int8"], size)
    if "int8-static" in encoders:
        static = encoders["int8-static"]
        report.ratios["int8_static_vs_fp32_b32"] = min(
            rates[("ort int8-static", t, 32)] / rates[("ort fp32", t, 32)]
            for t in ("vision", "text")
        )
        report.ratios["int8_static_min_cosine"] = int8_min_cosine(fp32, static, size)
        report.ratios["int8_static_batch_invariance"] = batch_invariance(static)

    # The pipeline runs the serving default (fp32) with max_batch_size set to the raw
    # session's best batch, as an operator would tune it.
    best_batch = max(BATCH_SIZES, key=lambda b: rates[("ort fp32", "vision", b)])
    raw_best = rates[("ort fp32", "vision", best_batch)]
    photos = [synthetic_photo(640, 480, seed) for seed in range(16)]
    pipeline_rates = asyncio.run(
        bench_pipeline(
            fp32,
            photos=photos,
            max_batch_size=best_batch,
            items=pipeline_items,
            report=report,
            name=name,
        )
    )
    report.ratios["batcher_vs_raw_c32"] = pipeline_rates["tensor", 32] / raw_best
    report.ratios["jpeg_vs_tensor"] = pipeline_rates["jpeg", 32] / pipeline_rates["tensor", 32]
    report.ratios["raw_best_batch_items_per_s"] = raw_best
    report.ratios["raw_best_batch_size"] = best_batch
    served = OnnxEncoder(bundle, EncoderOptions(precision="auto", warmup=False))
    report.ratios.update(
        asyncio.run(bench_text_path(served, seconds=seconds, report=report, name=name))
    )
    report.ratios.update(fast_jpeg_figures(bundle, work_dir))
    return report


def fast_jpeg_figures(bundle: Bundle, work_dir: Path) -> dict[str, float]:
    """Fast (DCT-scaled) vs exact JPEG decoding on the demo gallery at 512 px."""
    gallery = work_dir / "gallery-512"
    items = generate_gallery(gallery, 200, seed=11, size=512)
    data = [(gallery / item.path).read_bytes() for item in items]
    encoders = {
        fast: OnnxEncoder(bundle, EncoderOptions(precision="fp32", fast_jpeg=fast, warmup=False))
        for fast in (False, True)
    }
    seconds: dict[bool, float] = {}
    vectors: dict[bool, np.ndarray] = {}
    for fast, encoder in encoders.items():
        started = time.perf_counter()
        pixels = [encoder.preprocessor(d) for d in data]
        seconds[fast] = time.perf_counter() - started
        vectors[fast] = encoder.encode_images(pixels)
    cosines = np.sum(vectors[False] * vectors[True], axis=1)
    return {
        "fast_jpeg_min_cosine": float(cosines.min()),
        "fast_jpeg_decode_speedup": seconds[False] / seconds[True],
    }


def int8_min_cosine(fp32: OnnxEncoder, int8: OnnxEncoder, size: int) -> float:
    rng = np.random.default_rng(1)
    photos = [
        fp32.preprocessor(synthetic_photo(320 + 16 * i, 240 + 8 * i, 100 + i)) for i in range(16)
    ]
    pixels = np.stack(
        photos + [rng.standard_normal((3, size, size), dtype=np.float32) for _ in range(4)]
    )
    feeds = fp32.tokenizer.pad(fp32.tokenizer.tokenize(list(QUERIES)))
    cosines = [
        np.sum(fp32.run_vision(pixels) * int8.run_vision(pixels), axis=1),
        np.sum(fp32.run_text(feeds) * int8.run_text(feeds), axis=1),
    ]
    return float(min(c.min() for c in cosines))


def batch_invariance(encoder: OnnxEncoder) -> float:
    """Min cosine, both towers: each of 32 items alone vs its row in the batch of 32."""
    rng = np.random.default_rng(2)
    photos = [encoder.preprocessor(synthetic_photo(200 + 8 * i, 160, 300 + i)) for i in range(24)]
    size = encoder.manifest.vision.image_size
    pixels = np.stack(
        photos + [rng.standard_normal((3, size, size), dtype=np.float32) for _ in range(8)]
    )
    texts = list(invariance_texts())
    return min(
        batch_invariance_cosine(encoder.run_vision, pixels),
        batch_invariance_cosine(lambda batch: encoder.encode_text(list(batch)), texts),
    )


def text_batch(n: int) -> list[str]:
    """n queries of mixed lengths (the QUERIES, numbered so no two are the same text)."""
    return [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(n)]


async def bench_text_path(
    encoder: OnnxEncoder, *, seconds: float, report: ModelReport, name: str
) -> dict[str, float]:
    """The served text path vs the raw session on the same padded batches of 32, and where
    the time between them goes (per item, microseconds)."""
    texts = text_batch(32)
    tokenizer = encoder.tokenizer
    feeds = tokenizer.pad(tokenizer.tokenize(texts))
    one = [texts[5]]
    tokens = tokenizer.tokenize(texts)
    _, tokenize_ms = measure(functools.partial(tokenizer.tokenize, one), 1, seconds / 8)
    _, pad_ms = measure(functools.partial(tokenizer.pad, tokens), 32, seconds / 8)

    # The batcher alone (a batch function that returns at once): queueing, gather, scatter.
    empty: Batcher[int, int] = Batcher("noop", lambda items: items, max_batch_size=32)
    await empty.start()
    try:
        batcher_per_s = await concurrent_rate(
            lambda i: empty.submit([i]), concurrency=32, seconds=seconds / 4
        )
    finally:
        await empty.close()

    # Raw and served alternate in short rounds: on a shared machine the load drifts, and the
    # ratio of medians of neighbouring rounds holds up where two long runs would not.
    pipeline = EncodingPipeline(
        encoder,
        encoder.tokenizer,
        encoder.preprocessor,
        max_batch_size=32,
        max_wait_ms=2,
        max_queue=100_000,
    )
    await pipeline.start()
    raw_rates: list[float] = []
    served_rates: list[float] = []
    raw_ms: list[float] = []
    try:
        for _ in range(TEXT_ROUNDS):
            per_s, ms = measure(
                functools.partial(encoder.run_text, feeds), 32, seconds / TEXT_ROUNDS
            )
            raw_rates.append(per_s)
            raw_ms.append(ms)
            served_rates.append(
                await concurrent_rate(
                    lambda i: pipeline.encode_texts([texts[i % 32]], Priority.INTERACTIVE),
                    concurrency=32,
                    seconds=seconds / TEXT_ROUNDS,
                )
            )
        batches, items = pipeline.text_batcher.stats.batches, pipeline.text_batcher.stats.items
    finally:
        await pipeline.close()
    raw_per_s = statistics.median(raw_rates)
    served_per_s = statistics.median(served_rates)
    figures = {
        "text_batcher_vs_raw_c32": served_per_s / raw_per_s,
        "text_raw_b32_items_per_s": raw_per_s,
        "text_served_c32_items_per_s": served_per_s,
        "text_mean_batch_c32": items / max(batches, 1),
        "text_profile_inference_us_per_item": statistics.median(raw_ms) * 1000 / 32,
        "text_profile_tokenize_us_per_item": tokenize_ms * 1000,
        "text_profile_pad_us_per_item": pad_ms * 1000 / 32,
        "text_profile_batcher_us_per_item": 1e6 / batcher_per_s,
    }
    report.rows.append(
        {"runner": "pipeline text", "tower": "text", "concurrency": 32, "items_per_s": served_per_s}
    )
    print(
        f"  {name:>18} text raw b32 {raw_per_s:8.1f}/s, served c32 {served_per_s:8.1f}/s "
        f"(mean batch {figures['text_mean_batch_c32']:.1f})",
        file=sys.stderr,
    )
    return figures


async def concurrent_rate(call: Callable[[int], Any], *, concurrency: int, seconds: float) -> float:
    """Requests per second from `concurrency` callers, each awaiting `call(i)` in turn."""
    done = 0
    stop_at = 0.0

    async def caller(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop_at:
            await call(i)
            done += 1
            i += concurrency

    stop_at = time.perf_counter() + min(0.2, seconds / 4)  # warm up
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    done = 0
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    return done / (time.perf_counter() - started)


async def bench_pipeline(
    encoder: OnnxEncoder,
    *,
    photos: Sequence[bytes],
    max_batch_size: int,
    items: int,
    report: ModelReport,
    name: str,
) -> dict[tuple[str, int], float]:
    pipeline = EncodingPipeline(
        encoder,
        encoder.tokenizer,
        encoder.preprocessor,
        max_batch_size=max_batch_size,
        max_wait_ms=2,
        max_queue=100_000,
    )
    await pipeline.start()
    tensors = [encoder.preprocessor(p) for p in photos]
    rates: dict[tuple[str, int], float] = {}
    try:
        for kind in ("tensor", "jpeg"):
            for concurrency in CONCURRENCY:
                count = items if concurrency > 1 else max(8, items // 4)

                async def worker(offset: int, n: int, kind: str = kind) -> None:
                    for i in range(n):
                        index = (offset + i) % len(photos)
                        if kind == "jpeg":
                            await pipeline.encode_images([photos[index]], Priority.INTERACTIVE)
                        else:
                            await pipeline.encode_pixels([tensors[index]], Priority.INTERACTIVE)

                await worker(0, 4)  # warm
                per_worker = max(1, count // concurrency)
                started = time.perf_counter()
                await asyncio.gather(*(worker(w, per_worker) for w in range(concurrency)))
                per_s = per_worker * concurrency / (time.perf_counter() - started)
                rates[kind, concurrency] = per_s
                report.rows.append(
                    {
                        "runner": f"pipeline {kind}",
                        "tower": "vision",
                        "concurrency": concurrency,
                        "items_per_s": per_s,
                    }
                )
                print(
                    f"  {name:>18} pipeline {kind:>6} c{concurrency:<3} {per_s:8.1f}/s",
                    file=sys.stderr,
                )
    finally:
        await pipeline.close()
    return rates


def main(args: argparse.Namespace) -> int:
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    reports = []
    started = time.perf_counter()
    if not args.skip_vitb32:
        checkpoint, bundle_dir = ensure_vitb32(work)
        print("bench: ViT-B/32 (random weights)", file=sys.stderr)
        reports.append(
            bench_model(
                "vit-b/32 random",
                load_bundle(bundle_dir),
                checkpoint,
                seconds=args.seconds,
                pipeline_items=args.items,
                work_dir=work,
            )
        )
    demo_checkpoint = Path(args.demo_checkpoint) if args.demo_checkpoint else None
    print("bench: demo model", file=sys.stderr)
    reports.append(
        bench_model(
            "demo",
            load_bundle(default_bundle_path()),
            demo_checkpoint,
            seconds=args.seconds,
            pipeline_items=args.items * 4,
            work_dir=work,
        )
    )
    headline = reports[0].ratios
    result = {
        **{key: round(value, 4) for key, value in headline.items()},
        "targets": TARGETS,
        "passed": {k: headline.get(k, 0.0) >= v for k, v in TARGETS.items() if k in headline},
        "models": {r.name: {"ratios": r.ratios, "rows": r.rows} for r in reports},
        "machine": {"cpus": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for report in reports:
            print(f"\n{report.name}")
            for key, value in report.ratios.items():
                target = TARGETS.get(key)
                mark = (
                    ""
                    if target is None
                    else (" ok" if value >= target else f" MISS (target {target})")
                )
                print(f"  {key:>28}: {value:8.3f}{mark}")
    return 0
