"""Server-side image preprocessing vs transformers' CLIPImageProcessor (max abs diff <= 1e-4).

In transformers 5.23 `CLIPImageProcessor` is the torchvision backend (torchvision comes with
the [export] extra, for OpenCLIP) and `CLIPImageProcessorPil` is the PIL backend, the one
every CLIP checkpoint was trained and evaluated with. The reference is the PIL one.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from image_fixtures import OPENAI_MEAN, OPENAI_STD, encode, pattern
from PIL import Image

from clipsearch.server.bundle import VisionSpec
from clipsearch.server.errors import BundleError
from clipsearch.server.images import ImagePreprocessor

transformers = pytest.importorskip("transformers", reason="the reference needs transformers")

BAR = 1e-4
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "PA", "CMYK", "1", "YCbCr", "RGBa"]
SIZES = [(224, 224), (320, 200), (200, 320), (5, 3), (3, 5), (1, 1), (225, 224), (640, 480)]
# Every mode at a few sizes, every size in RGB and RGBA.
CASES = [(m, s) for m in MODES for s in SIZES[1:4]] + [
    (m, s) for m in ("RGB", "RGBA") for s in SIZES if s not in SIZES[1:4]
]
# (resize shortest edge, crop): CLIP's 224/224, a tiny model's 32/32, a 256 -> 224 crop, and
# a crop larger than the resize (transformers pads with zeros).
CONFIGS = [(224, 224), (32, 32), (256, 224), (200, 224)]


def reference(resize: int, crop: int, **kwargs: Any) -> Any:
    return transformers.CLIPImageProcessorPil(
        size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop}, **kwargs
    )


def ours(resize: int, crop: int, **kwargs: Any) -> ImagePreprocessor:
    spec = VisionSpec(
        image_size=crop, resize_shortest_edge=resize, mean=OPENAI_MEAN, std=OPENAI_STD, **kwargs
    )
    return ImagePreprocessor(spec, fast_jpeg=False)


def hf_pixels(processor: Any, image: Image.Image) -> np.ndarray:
    out: np.ndarray = processor(image, return_tensors="np")["pixel_values"][0]
    return out


@pytest.mark.parametrize(("resize", "crop"), CONFIGS)
def test_matches_clip_image_processor_across_sizes_and_modes(resize: int, crop: int) -> None:
    hf, mine = reference(resize, crop), ours(resize, crop)
    worst = 0.0
    for seed, (mode, size) in enumerate(CASES):
        image = pattern(size, mode, seed)
        expected = hf_pixels(hf, image)
        got = mine.from_image(image)
        assert got.dtype == np.float32
        assert got.shape == expected.shape == (3, crop, crop), (mode, size)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= BAR
    # Stronger than the bar: the same Pillow calls and float32 arithmetic, bit for bit.
    assert worst == 0.0


@pytest.mark.parametrize("size", [(2000, 1500), (1500, 2000), (1024, 683)])
def test_matches_on_large_images(size: tuple[int, int]) -> None:
    image = pattern(size, "RGB", seed=3)
    expected = hf_pixels(reference(224, 224), image)
    np.testing.assert_array_equal(ours(224, 224).from_image(image), expected)


def test_bytes_path_matches_on_lossless_formats() -> None:
    hf, mine = reference(224, 224), ours(224, 224)
    cases = [
        (pattern((320, 200), "RGB", 1), "PNG"),
        (pattern((150, 250), "L", 2), "PNG"),
        (pattern((96, 64), "RGBA", 3), "PNG"),
        (pattern((40, 70), "LA", 4), "PNG"),
        (pattern((120, 80), "P+transparency", 5), "GIF"),
        (pattern((120, 90), "CMYK", 6), "TIFF"),
        (pattern((300, 300), "RGB", 7), "BMP"),
        (pattern((300, 260), "RGBA", 8), "WEBP"),
    ]
    for image, fmt in cases:
        params = {"lossless": True} if fmt == "WEBP" else {}
        data = encode(image, fmt, **params)
        expected = hf_pixels(hf, Image.open(io.BytesIO(data)))
        assert np.abs(mine(data) - expected).max() <= BAR, fmt


def test_normalization_follows_the_spec() -> None:
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.4, 0.8)
    image = pattern((64, 48), "RGB", 9)
    hf = reference(32, 32, image_mean=list(mean), image_std=list(std), rescale_factor=1 / 127.5)
    spec = VisionSpec(32, 32, mean, std, rescale_factor=1 / 127.5)
    got = ImagePreprocessor(spec).from_image(image)
    assert np.abs(got - hf_pixels(hf, image)).max() <= BAR


def test_other_resample_filters_follow_the_spec() -> None:
    image = pattern((300, 200), "RGB", 10)
    for name, code in [("bilinear", 2), ("lanczos", 1), ("nearest", 0)]:
        hf = reference(64, 64, resample=code)
        got = ours(64, 64, resample=name).from_image(image)
        assert np.abs(got - hf_pixels(hf, image)).max() <= BAR, name


def test_elongated_images_are_exact_up_to_64_to_1() -> None:
    hf, mine = reference(224, 224), ours(224, 224)
    for size in [(2000, 40), (40, 2000)]:
        image = pattern(size, "RGB", 11)
        np.testing.assert_array_equal(mine.from_image(image), hf_pixels(hf, image))


def test_extremely_elongated_images_resample_only_the_crop() -> None:
    # 4000 x 9 at shortest edge 224 would be a 99,555 x 224 intermediate: only the crop is
    # resampled (same filter and scale): close to transformers on average, not bit-exact.
    hf, mine = reference(224, 224), ours(224, 224)
    level = 1 / 255 / min(OPENAI_STD)
    for size in [(4000, 9), (9, 4000)]:
        image = pattern(size, "RGB", 11)
        got, expected = mine.from_image(image), hf_pixels(hf, image)
        diff = np.abs(got - expected)
        assert got.shape == (3, 224, 224)
        assert diff.mean() <= 0.5 * level, size
        cosine = float(got.ravel() @ expected.ravel())
        cosine /= float(np.linalg.norm(got) * np.linalg.norm(expected))
        assert cosine >= 0.999, size


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    image = pattern((120, 80), "I;16", 12)
    scaled = Image.fromarray(
        ((np.asarray(image, dtype=np.int64) * 255 + 32767) // 65535).astype(np.uint8), "L"
    )
    mine = ours(32, 32)
    got = mine(encode(image, "PNG"))
    hf = reference(32, 32)
    assert np.abs(got - hf_pixels(hf, scaled)).max() <= BAR
    # transformers' convert("RGB") clips 16-bit values above 255: an all-white image.
    clipped = hf_pixels(hf, image)
    assert np.allclose(clipped, clipped.reshape(3, -1)[:, :1, None])
    assert not np.allclose(got, clipped, atol=0.1)


def test_fast_jpeg_decodes_at_reduced_size_never_below_the_target() -> None:
    fast = ImagePreprocessor(VisionSpec(224, 224, OPENAI_MEAN, OPENAI_STD), fast_jpeg=True)
    exact = ImagePreprocessor(VisionSpec(224, 224, OPENAI_MEAN, OPENAI_STD), fast_jpeg=False)
    cases = {
        (1600, 1200): (400, 300),  # scale 1/4 (1/5 would be allowed, libjpeg has 1/4)
        (2400, 1800): (300, 225),  # 1/8
        (900, 460): (450, 230),  # 1/2
        (447, 600): (447, 600),  # 1/2 would give 223 < 224: full size
        (300, 250): (300, 250),
    }
    for size, decoded in cases.items():
        data = encode(pattern(size, "RGB", 13), "JPEG", quality=90)
        assert fast.decode(data).size == decoded, size
        assert exact.decode(data).size == size
        assert min(fast.decode(data).size) >= 224


def test_fast_jpeg_pixels_stay_close_to_the_exact_path() -> None:
    fast = ImagePreprocessor(VisionSpec(224, 224, OPENAI_MEAN, OPENAI_STD), fast_jpeg=True)
    exact = ImagePreprocessor(VisionSpec(224, 224, OPENAI_MEAN, OPENAI_STD), fast_jpeg=False)
    image = pattern((1600, 1200), "RGB", 14).resize((400, 300)).resize((1600, 1200))
    data = encode(image, "JPEG", quality=90)
    a, b = fast(data), exact(data)
    cosine = float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.999
    assert np.abs(a - b).mean() < 0.03


def test_concurrent_calls_give_the_sequential_results() -> None:
    mine = ours(224, 224)
    blobs = [
        encode(pattern((200 + 37 * i, 180 + 11 * i), "RGB", i), "PNG" if i % 2 else "JPEG")
        for i in range(12)
    ]
    expected = [mine(b) for b in blobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(3):
            got = list(pool.map(mine, blobs))
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"resample": "cubic-ish"}, "resample"), ({"crop": "top"}, "crop")],
)
def test_unsupported_specs_are_refused(changes: dict[str, str], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        ImagePreprocessor(VisionSpec(224, 224, OPENAI_MEAN, OPENAI_STD, **changes))  # type: ignore[arg-type]
