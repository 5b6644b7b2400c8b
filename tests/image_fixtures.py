"""Deterministic test images, generated in code, for the image preprocessing and decoding tests."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def pattern(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients, stripes and noise: detail at every scale, so resampling shows."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = (np.sin(x / (2.0 + 5 * rng.random()) + y / 7.0) * 0.5 + 0.5) * 255
    green = y / max(height - 1, 1) * 255
    blue = rng.integers(0, 256, (height, width)).astype(np.float64)
    alpha = x / max(width - 1, 1) * 255
    rgba = Image.fromarray(np.stack([red, green, blue, alpha], -1).astype(np.uint8), "RGBA")
    return convert(rgba, mode)


def convert(rgba: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    if mode == "P+transparency":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
        image.info["transparency"] = 5
        return image
    if mode == "I;16":
        grey = np.asarray(rgba.convert("L"), dtype=np.uint16)
        return Image.fromarray(grey * 257 + 3)  # full 16-bit range
    if mode == "F":
        return Image.fromarray(np.asarray(rgba.convert("L"), dtype=np.float32) / 255)
    return rgba.convert(mode)


def solid(
    size: tuple[int, int],
    colour: int | tuple[int, int, int] | tuple[int, int, int, int],
    mode: str = "RGB",
) -> Image.Image:
    return Image.new(mode, size, colour)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit RGB) and carries no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    """JPEG bytes carrying the EXIF Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())
