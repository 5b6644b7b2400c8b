"""Image bytes -> RGB: formats, modes, EXIF orientation, limits, the error for each bad input."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from image_fixtures import (
    OPENAI_MEAN,
    OPENAI_STD,
    encode,
    pattern,
    png_header_only,
    solid,
    with_orientation,
)
from PIL import Image, ImageOps

from clipsearch.server.bundle import VisionSpec
from clipsearch.server.errors import (
    EmptyImage,
    ErrorCode,
    ImageError,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageFormat,
)
from clipsearch.server.images import ImageLimits, ImagePreprocessor

SPEC = VisionSpec(224, 224, OPENAI_MEAN, OPENAI_STD)
RED = (200, 30, 60)


def decoder(limits: ImageLimits | None = None, fast_jpeg: bool = False) -> ImagePreprocessor:
    return ImagePreprocessor(SPEC, limits=limits or ImageLimits(), fast_jpeg=fast_jpeg)


def centre(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[image.height // 2, image.width // 2])


def close(got: tuple[int, ...], want: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(int(g) - int(w)) <= tolerance for g, w in zip(got, want, strict=True))


# --- formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("JPEG", {"quality": 95}, 4),
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 6),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
    ],
)
def test_accepted_formats_decode_to_rgb(
    fmt: str, params: dict[str, object], tolerance: int
) -> None:
    image = decoder().decode(encode(solid((48, 32), RED), fmt, **params))
    assert image.mode == "RGB"
    assert image.size == (48, 32)
    assert close(centre(image), RED, tolerance), centre(image)


def test_mpo_first_picture_is_decoded() -> None:
    first, second = solid((40, 30), RED), solid((40, 30), (0, 0, 255))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decoder().decode(data)
    assert close(centre(image), RED, 4)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(fmt: str) -> None:
    frames = [solid((30, 20), RED), solid((30, 20), (0, 200, 0)), solid((30, 20), (0, 0, 200))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert close(centre(decoder().decode(data)), RED, 2)


# --- modes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (solid((20, 20), 90, "L"), "PNG", (90, 90, 90)),
        (solid((20, 20), 90, "L"), "JPEG", (90, 90, 90)),
        (solid((20, 20), 1, "1"), "BMP", (255, 255, 255)),
        (solid((20, 20), 1, "1"), "TIFF", (255, 255, 255)),
        (solid((20, 20), (0, 0, 0, 0), "CMYK"), "JPEG", (255, 255, 255)),
        (solid((20, 20), (255, 0, 0, 0), "CMYK"), "TIFF", (0, 255, 255)),
        (solid((20, 20), RED).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", RED),
        (solid((20, 20), RED).convert("P", palette=Image.Palette.ADAPTIVE), "BMP", RED),
    ],
    ids=["L-png", "L-jpeg", "1-bmp", "1-tiff", "CMYK-jpeg", "CMYK-tiff", "P-png", "P-bmp"],
)
def test_opaque_modes_convert_to_rgb(
    image: Image.Image, fmt: str, expected: tuple[int, int, int]
) -> None:
    data = encode(image, fmt)
    got = decoder().decode(data)
    assert got.mode == "RGB"
    assert close(centre(got), expected, 4), (centre(got), expected)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF"), ("LA", "PNG"), ("LA", "TIFF")],
)
def test_transparency_is_composited_onto_white(mode: str, fmt: str) -> None:
    # Left half transparent, right half opaque red.
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:, :, :3] = RED
    rgba[:, 20:, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert(mode)
    params: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    got = np.asarray(decoder().decode(encode(image, fmt, **params)))
    assert tuple(got[10, 5]) == (255, 255, 255)
    opaque = tuple(int(v) for v in np.asarray(image.convert("RGBA").convert("RGB"))[10, 30])
    assert tuple(int(v) for v in got[10, 30]) == opaque


def test_palette_transparency_is_composited_onto_white() -> None:
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 * 3 - 6))
    image.paste(1, (10, 0, 20, 10))
    data = encode(image, "GIF", transparency=0)
    got = np.asarray(decoder().decode(data))
    assert tuple(got[5, 2]) == (255, 255, 255)
    assert tuple(got[5, 15]) == RED


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_images_are_scaled_to_eight_bits(fmt: str) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = np.asarray(decoder().decode(data))
    assert got[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.all(got[..., 0] == got[..., 1])


def test_32_bit_integer_tiff_is_read_as_16_bit_range() -> None:
    values = np.array([[0, 257, 65535, 70000]], dtype=np.int32).repeat(2, axis=0)
    data = encode(Image.fromarray(values, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.asarray(decoder().decode(data))[0, :, 0].tolist() == [0, 1, 255, 255]


def test_floating_point_images_are_unsupported() -> None:
    data = encode(pattern((16, 16), "F"), "TIFF")
    with pytest.raises(UnsupportedImageFormat, match="floating point"):
        decoder().decode(data)


# --- EXIF orientation --------------------------------------------------------------------


def quadrants() -> Image.Image:
    """40 x 20: red, green on top; blue, white below. Every orientation looks different."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:10, :20] = (255, 0, 0)
    pixels[:10, 20:] = (0, 255, 0)
    pixels[10:, :20] = (0, 0, 255)
    pixels[10:, 20:] = (255, 255, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fast_jpeg", [False, True])
def test_exif_orientation_is_applied(orientation: int, fast_jpeg: bool) -> None:
    data = with_orientation(quadrants(), orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    got = decoder(fast_jpeg=fast_jpeg).decode(data)
    assert got.size == expected.size == ((40, 20) if orientation <= 4 else (20, 40))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_orientation_6_turns_the_picture_clockwise() -> None:
    got = np.asarray(decoder().decode(with_orientation(quadrants(), 6)))
    # Stored left column (red over blue) becomes the top row (blue, red from left to right).
    assert got.shape == (40, 20, 3)
    assert close(tuple(got[5, 5]), (0, 0, 255), 8)
    assert close(tuple(got[5, 15]), (255, 0, 0), 8)
    assert close(tuple(got[35, 15]), (0, 255, 0), 8)


def test_png_exif_orientation_is_applied_too() -> None:
    exif = Image.Exif()
    exif[0x0112] = 3
    data = encode(quadrants(), "PNG", exif=exif.tobytes())
    got = np.asarray(decoder().decode(data))
    assert tuple(got[0, 0]) == (255, 255, 255)
    assert tuple(got[19, 39]) == (255, 0, 0)


# --- bad input ---------------------------------------------------------------------------


def test_zero_bytes_is_an_empty_image() -> None:
    with pytest.raises(EmptyImage):
        decoder().decode(b"")


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text and not an image at all\n" * 20,
        b'{"json": "document"}',
        bytes(range(256)) * 8,
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
    ],
    ids=["text", "json", "random", "png-signature-only", "jpeg-soi-only"],
)
def test_non_images_are_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableImage):
        decoder().decode(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_images_are_undecodable(fmt: str) -> None:
    data = encode(pattern((120, 90), "RGB", 1).convert("P" if fmt == "GIF" else "RGB"), fmt)
    with pytest.raises(UndecodableImage):
        decoder().decode(data[: len(data) // 2])


def test_corrupt_png_data_is_undecodable() -> None:
    data = bytearray(encode(pattern((64, 64), "RGB", 2), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # zeroed deflate stream
    with pytest.raises(UndecodableImage):
        decoder().decode(bytes(data))


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "PPM", "TGA", "EPS", "QOI", "SGI"])
def test_real_images_in_other_formats_are_unsupported(fmt: str) -> None:
    data = encode(solid((16, 16), RED), fmt)
    with pytest.raises(UnsupportedImageFormat, match=f"^{fmt} images are not accepted"):
        decoder().decode(data)


# --- limits ------------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # No pixel data at all: decoding would fail as corrupt, so TooLarge proves the order.
    with pytest.raises(ImageTooLarge, match="8000x7000"):
        decoder().decode(png_header_only(8000, 7000))


def test_pixel_limit_boundary() -> None:
    limits = ImageLimits(max_pixels=100)
    assert decoder(limits).decode(encode(solid((10, 10), RED), "PNG")).size == (10, 10)
    with pytest.raises(ImageTooLarge):
        decoder(limits).decode(encode(solid((11, 10), RED), "PNG"))


def test_decompression_bomb_is_refused() -> None:
    with pytest.raises(ImageTooLarge):
        decoder().decode(png_header_only(100_000, 100_000))


def test_pillow_bomb_error_maps_to_too_large_even_with_a_high_limit() -> None:
    # 400M pixels: over our limit of 10^12 no, but over Pillow's own bomb error threshold.
    with pytest.raises(ImageTooLarge, match="too large to decode"):
        decoder(ImageLimits(max_pixels=10**12)).decode(png_header_only(20_000, 20_000))


def test_pillow_bomb_warning_as_error_maps_to_too_large() -> None:
    # 100M pixels is between Pillow's warning (89M) and error (179M) thresholds.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge):
            decoder(ImageLimits(max_pixels=10**12)).decode(png_header_only(10_000, 10_000))


def test_byte_limit_boundary() -> None:
    data = encode(solid((10, 10), RED), "PNG")
    assert decoder(ImageLimits(max_bytes=len(data))).decode(data).size == (10, 10)
    with pytest.raises(ImageTooLarge, match="bytes"):
        decoder(ImageLimits(max_bytes=len(data) - 1)).decode(data)


def test_every_image_error_is_invalid_argument() -> None:
    for error in (EmptyImage, UndecodableImage, UnsupportedImageFormat, ImageTooLarge):
        assert issubclass(error, ImageError)
        assert error.code is ErrorCode.INVALID_ARGUMENT


def test_call_returns_pixel_values_for_good_bytes() -> None:
    pixels = decoder()(encode(pattern((300, 200), "RGB", 3), "JPEG"))
    assert pixels.shape == (3, 224, 224)
    assert pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
