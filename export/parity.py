"""Parity of an exported bundle against PyTorch, on fixed inputs.

The PyTorch side is what a user of the family does: its own tokenizer (padded as the family
pads, truncated at the context length) and its own image processor (transformers' PIL
backend, or OpenCLIP's pipeline) feeding the family's feature functions. The ONNX Runtime
side is what the server does: `clipsearch.server.text` and `clipsearch.server.images` on the
same texts and the same encoded image bytes, one padded batch per tower. A miss is therefore
a fault in the graph or in our preprocessing; both are what serving would get wrong.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from clipsearch.server.bundle import Parity, TextSpec, VisionSpec
from clipsearch.server.images import ImagePreprocessor
from clipsearch.server.text import TextTokenizer

if TYPE_CHECKING:
    from clipsearch.export.families.base import FamilyModel

# Batch invariance is measured on a full serving batch: alone vs inside a batch of 32.
INVARIANCE_BATCH = 32

PARITY_TEXTS: tuple[str, ...] = (
    "a photo of a cat",
    "A red circle and a blue square on a white background.",
    "红色的圆形",
    "一只黑色的狗在绿色的草地上奔跑",
    "",
    "   \t\n  ",
    "emoji 🐱🚀 & punctuation?!... (brackets) [1, 2, 3] — “quotes” 'n' stuff",
    "Hello 世界, mixed 文字 and English 123",
    "2024-06-01 12:30: price $9.99 (50% off!)",
    " ".join(f"word{i} and more" for i in range(40)),  # far past the context length
    "x" * 300,  # one very long word
    "dog",
)


@dataclass(frozen=True)
class ParityImage:
    name: str
    data: bytes  # encoded, lossless: the decoded pixels are exactly the generated ones


@lru_cache(maxsize=1)
def parity_images() -> tuple[ParityImage, ...]:
    """Deterministic images of varied size, aspect, mode and format, generated in code."""
    specs: list[tuple[str, str, tuple[int, int], str]] = [
        ("wide_rgb", "RGB", (320, 200), "PNG"),
        ("tall_rgb", "RGB", (90, 400), "PNG"),
        ("grayscale", "L", (150, 250), "PNG"),
        ("rgba", "RGBA", (96, 64), "PNG"),
        ("gray_alpha", "LA", (40, 70), "PNG"),
        ("palette_transparent", "P", (120, 80), "GIF"),
        ("cmyk", "CMYK", (120, 90), "TIFF"),
        ("tiny", "RGB", (5, 3), "PNG"),
        ("large", "RGB", (2000, 1500), "BMP"),
    ]
    return tuple(
        ParityImage(name, _encode(_scene(mode, size, seed), fmt))
        for seed, (name, mode, size, fmt) in enumerate(specs)
    )


def _scene(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        (np.sin(x / (3 + 7 * rng.random()) + rng.random() * 6) * 0.5 + 0.5) * 255,
        (y / max(height - 1, 1)) * 255,
        ((x + y) % (17 + seed)) / (17 + seed) * 255,
        (x / max(width - 1, 1)) * 255,  # alpha: transparent on the left, opaque on the right
    ]
    rgba = np.stack(channels, axis=-1).astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(1, width)), y0 + int(rng.integers(1, height))
        r, g, b, a = (int(c) for c in rng.integers(0, 256, 4))
        draw.ellipse((x0, y0, x1, y1), fill=(r, g, b, a))
    if mode == "P":
        palette = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        palette.info["transparency"] = 0
        return palette
    return image.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# --- the two sides ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """PyTorch embeddings (unnormalized) of PARITY_TEXTS and parity_images()."""

    text: np.ndarray
    image: np.ndarray


def torch_reference(family: FamilyModel, images: Sequence[ParityImage]) -> Reference:
    """The family's own tokenizer and image processor feeding its PyTorch towers."""
    import torch

    tokens = family.tokenize(list(PARITY_TEXTS))
    pixels = family.preprocess([Image.open(io.BytesIO(image.data)) for image in images])
    with torch.no_grad():
        text_tower = family.text_tower if family.text_reference is None else family.text_reference
        text = text_tower(*[tokens[name] for name in family.text_spec.inputs])
        image = family.vision_tower(pixels)
    return Reference(text=text.numpy(), image=image.numpy())


@dataclass(frozen=True)
class OnnxTowers:
    """ONNX Runtime sessions of one precision variant, fed by the server's preprocessing."""

    text_session: Any
    vision_session: Any
    tokenizer: TextTokenizer
    preprocessor: ImagePreprocessor

    @classmethod
    def load(
        cls,
        text_file: Path,
        vision_file: Path,
        tokenizer_file: Path,
        text_spec: TextSpec,
        vision_spec: VisionSpec,
        *,
        precision: str = "fp32",
    ) -> OnnxTowers:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # fp16 on CPU warns about every inserted Cast
        providers = ["CPUExecutionProvider"]
        # ONNX Runtime 1.32's CPU NCHWc layout pass crashes (SIGSEGV) on OpenCLIP's fp16
        # vision graph; it only re-lays out Convs for the CPU (fp16 is served on GPUs).
        disabled = ["NchwcTransformer"] if precision == "fp16" else []

        def session(path: Path) -> Any:
            return ort.InferenceSession(
                str(path), options, providers=providers, disabled_optimizers=disabled
            )

        return cls(
            text_session=session(text_file),
            vision_session=session(vision_file),
            tokenizer=TextTokenizer(tokenizer_file, text_spec),
            preprocessor=ImagePreprocessor(vision_spec, fast_jpeg=False),
        )

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        feeds = self.tokenizer.pad(self.tokenizer.tokenize(texts))
        out: np.ndarray = self.text_session.run(None, feeds)[0]
        return out

    def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        return self.run_vision(self.preprocess(images))

    def preprocess(self, images: Sequence[bytes]) -> np.ndarray:
        return np.stack([self.preprocessor(data) for data in images])

    def run_vision(self, pixels: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.vision_session.run(None, {"pixel_values": pixels})[0]
        return out


def compare(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Per-row cosine; max_abs_diff is between the L2-normalized rows (what the server serves)."""
    ref = _normalized(reference)
    got = _normalized(candidate)
    cosines = np.sum(ref * got, axis=1)
    return Parity(
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        max_abs_diff=float(np.abs(ref - got).max()),
        n_inputs=len(cosines),
    )


def batch_invariance(
    encode: Callable[[Any], np.ndarray], items: Sequence[Any] | np.ndarray
) -> float:
    """Largest difference between an item encoded alone and its row in the whole batch.

    `items` is what `encode` takes (a list of texts, an array of pixels); sliced per item.
    """
    batch = _normalized(encode(items))
    singles = _normalized(np.concatenate([encode(items[i : i + 1]) for i in range(len(items))]))
    return float(np.abs(batch - singles).max())


def batch_invariance_cosine(
    encode: Callable[[Any], np.ndarray], items: Sequence[Any] | np.ndarray
) -> float:
    """Min cosine between each item encoded alone and its row in the batch of all `items`."""
    batch = _normalized(encode(items))
    singles = _normalized(np.concatenate([encode(items[i : i + 1]) for i in range(len(items))]))
    return float(np.sum(batch * singles, axis=1).min())


def invariance_texts() -> tuple[str, ...]:
    """INVARIANCE_BATCH texts of very different lengths: the parity texts, then captions."""
    from clipsearch.export import demo_data

    pairs = [
        demo_data.caption_text(((a.name, "circle"), (b.name, "star")), language)
        for a, b in zip(demo_data.COLOURS, demo_data.COLOURS[1:], strict=False)
        for language in ("en", "zh")
    ]
    captions = [
        demo_data.caption_text(((c.name, s.name),), "en")
        for c in demo_data.COLOURS
        for s in demo_data.SHAPES
    ]
    texts = (*PARITY_TEXTS, *pairs, *captions)
    return texts[:INVARIANCE_BATCH]


@lru_cache(maxsize=1)
def invariance_images() -> tuple[bytes, ...]:
    """INVARIANCE_BATCH encoded images: the parity images, then rendered scenes."""
    from clipsearch.export import demo_data

    scenes = [
        demo_data.encode_jpeg(
            demo_data.render_scene(demo_data.sample_scene(demo_data.scene_rng(0x1A7, i)), 96)
        )
        for i in range(INVARIANCE_BATCH)
    ]
    return tuple([i.data for i in parity_images()] + scenes)[:INVARIANCE_BATCH]


def _normalized(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    out: np.ndarray = x64 / np.maximum(norms, 1e-12)
    return out
