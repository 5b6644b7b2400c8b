"""Calibration data for static int8: the images and texts whose activations set the scales.

The built-in set is deterministic (the same bytes on every run): rendered shape scenes from
`demo_data` plus photo-like synthetic images (gradients, texture, noise, varied sizes), and
captions of those scenes in English and Chinese plus general captions. A user's own set is a
directory or a manifest file (`load_calibration`). Images go through the server's
`ImagePreprocessor` and texts through the bundle's tokenizer (checked against the
checkpoint's own at export), so the activations calibrated are the ones served.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TEXT_SUFFIXES = frozenset({".txt"})
_TEXT_COLUMNS = ("text", "caption", "caption_en", "caption_zh")
_IMAGE_COLUMNS = ("path", "image", "file")
# Its own seed stream: the held-out evaluation (demo_eval) and training use others.
_CALIBRATION_SEED = 0xCA11B

GENERAL_CAPTIONS: tuple[str, ...] = (
    "a photo of a dog",
    "a photo of a cat sleeping on a sofa",
    "a red car parked on a quiet street at night",
    "two people walking on the beach at sunset",
    "a bowl of noodles with chopsticks",
    "a diagram of a neural network with many layers and arrows",
    "an orange cat sleeping on a laptop keyboard",
    "a city skyline with tall buildings and a river",
    "a close-up of a flower with water drops",
    "a man riding a bicycle down a mountain road",
    "a plate of fruit on a wooden table",
    "a black and white photo of an old train station",
    "sunset",
    "dog",
    "一只狗在草地上奔跑",
    "城市夜景",
    "桌子上的一碗面条",
    "a child holding a red balloon in a park, smiling at the camera, on a sunny afternoon",
)


@dataclass(frozen=True)
class CalibrationSet:
    """Encoded image bytes and texts; `source` says where they came from (for the manifest)."""

    images: tuple[bytes, ...]
    texts: tuple[str, ...]
    source: str

    def describe(self) -> str:
        return f"{self.source}: {len(self.images)} images, {len(self.texts)} texts"


def builtin_calibration_set(n_scenes: int = 48, n_photos: int = 16) -> CalibrationSet:
    """Deterministic: rendered scenes, synthetic photo-like images and captions."""
    from clipsearch.export import demo_data

    images: list[bytes] = []
    texts: list[str] = []
    for index in range(n_scenes):
        rng = demo_data.scene_rng(_CALIBRATION_SEED, index)
        scene = demo_data.sample_scene(rng)
        images.append(demo_data.encode_jpeg(demo_data.render_scene(scene, 128 + 32 * (index % 4))))
        objects = tuple((o.colour, o.shape) for o in scene.objects)
        texts.append(demo_data.caption_text(objects, "en", rng))
        texts.append(demo_data.caption_text(objects, "zh", rng))
    images += [_photo_like(index) for index in range(n_photos)]
    texts += GENERAL_CAPTIONS
    return CalibrationSet(tuple(images), tuple(texts), f"built-in (seed {_CALIBRATION_SEED:#x})")


def load_calibration(path: str | Path) -> CalibrationSet:
    """A user's calibration images and texts.

    A directory: every image file in it (sorted, subdirectories included) and every line of
    every .txt file. A manifest (.jsonl or .csv, like `clipsearch demo-data` writes): one row
    per item with an image path (column path, image or file; relative to the manifest) and/or
    texts (columns text, caption, caption_en, caption_zh). Raises ValueError when it holds
    no image or no text: both towers need calibrating.
    """
    root = Path(path)
    if root.is_dir():
        images, texts = _read_directory(root)
    elif root.is_file():
        images, texts = _read_manifest(root)
    else:
        raise ValueError(f"calibration set {root} is neither a directory nor a file")
    if not images or not texts:
        raise ValueError(
            f"calibration set {root} has {len(images)} images and {len(texts)} texts; "
            "both towers need at least one"
        )
    return CalibrationSet(tuple(images), tuple(texts), str(root))


def batches(items: Sequence[np.ndarray], size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(items), size):
        yield np.stack(items[start : start + size])


def _read_directory(root: Path) -> tuple[list[bytes], list[str]]:
    images: list[bytes] = []
    texts: list[str] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = file.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(file.read_bytes())
        elif suffix in TEXT_SUFFIXES:
            texts += _lines(file.read_text(encoding="utf-8"))
    return images, texts


def _read_manifest(file: Path) -> tuple[list[bytes], list[str]]:
    if file.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
    elif file.suffix.lower() == ".csv":
        with file.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"calibration manifest {file} must be .jsonl or .csv")
    images: list[bytes] = []
    texts: list[str] = []
    for row in rows:
        image = next((row[c] for c in _IMAGE_COLUMNS if row.get(c)), None)
        if image:
            images.append((file.parent / str(image)).read_bytes())
        texts += [str(row[c]) for c in _TEXT_COLUMNS if row.get(c)]
    return images, texts


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _photo_like(seed: int) -> bytes:
    """Smooth colour fields, edges and sensor-like noise, at several sizes and aspects."""
    rng = np.random.default_rng(np.random.SeedSequence([_CALIBRATION_SEED, 1, seed]))
    width, height = int(rng.integers(160, 640)), int(rng.integers(160, 640))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(8, 90, 2)
        phase = rng.uniform(0, 6.3)
        channels.append(128 + 90 * np.sin(x / fx + phase) * np.cos(y / fy))
    base = np.stack(channels, axis=-1)
    for _ in range(int(rng.integers(2, 6))):  # hard-edged blocks: objects against a background
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = (
            x0 + int(rng.integers(8, width // 2 + 9)),
            y0 + int(rng.integers(8, height // 2 + 9)),
        )
        base[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    noisy = np.clip(base + rng.normal(0, rng.uniform(2, 20), base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
