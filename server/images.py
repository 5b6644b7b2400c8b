"""Image bytes -> the vision tower's pixel_values, with Pillow and numpy (no transformers).

`from_image` reproduces transformers' image processors (the PIL backends of
CLIPImageProcessor, ChineseCLIPImageProcessor, SiglipImageProcessor in transformers 5) bit
for bit, following the manifest's image rule: RGB conversion that composites transparency onto
white, then either a resize of the shortest edge with the same integer size rule and a center
crop (zero padding where the crop is larger), or a straight resize to the square ("squash":
Chinese-CLIP, SigLIP); rescale in float64 then float32, and normalization in float32. The last
two are one lookup table per channel, exact and fast. OpenCLIP's torchvision pipeline differs
in details the rule also names: its crop offsets round half to even ("center_round"), and it
resizes and crops in the image's own mode and converts to RGB last, dropping alpha
(convert_rgb "last"); its float32 division by 255 differs from the table by at most one
float32 ulp.

`decode` is the server's part: format allow-list, byte and pixel limits checked before pixel
data is decoded, EXIF orientation, first frame of animations, and two deliberate differences
from feeding Pillow's image to transformers:
- 16-bit images (modes I;16*, I) are scaled to 8 bits (v * 255 / 65535, rounded) before the
  RGB conversion; transformers' convert("RGB") would clip every value above 255 to white.
- with `fast_jpeg`, large JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (DCT scaling,
  Pillow's `draft`), never below the resize target, before the exact resize.

Thread-safe: every call works on its own Image objects; no global Pillow setting is changed.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from clipsearch.server.bundle import CROP_RULES, RESIZE_RULES, RGB_RULES, VisionSpec
from clipsearch.server.errors import (
    BundleError,
    EmptyImage,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageFormat,
)

if TYPE_CHECKING:
    from clipsearch.server.bundle import Bundle

# Pillow's plugin names. The JPEG plugin also opens MPO, the multi-picture JPEG that many
# phone cameras write (first picture).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_JPEG_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What Pillow raises on corrupt or truncated data, depending on the plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# Resizing a very elongated image by its shortest edge makes a huge intermediate (1 x 10,000
# px -> 224 x 2,240,000). Past this many times the crop area (an aspect ratio over 64:1),
# only the crop is resampled (Pillow's resize box): same filter and scale, yet not bit-exact
# (on average a fraction of an 8-bit level; single pixels of a strip upscaled ~25x, up to ~20).
_MAX_RESIZE_AREA_RATIO = 64


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000


class ImagePreprocessor:
    def __init__(
        self, spec: VisionSpec, limits: ImageLimits = ImageLimits(), fast_jpeg: bool = True
    ) -> None:
        if spec.resample not in _RESAMPLE:
            raise BundleError(f"vision resample {spec.resample!r} is not one of {list(_RESAMPLE)}")
        rules = {"resize": RESIZE_RULES, "crop": CROP_RULES, "convert_rgb": RGB_RULES}
        for name, known in rules.items():
            if getattr(spec, name) not in known:
                raise BundleError(
                    f"vision {name} {getattr(spec, name)!r} is not supported (one of {known})"
                )
        self.spec = spec
        self.limits = limits
        self.fast_jpeg = fast_jpeg
        self._resample = _RESAMPLE[spec.resample]
        self._lut = _normalization_table(spec)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, limits: ImageLimits = ImageLimits(), fast_jpeg: bool = True
    ) -> ImagePreprocessor:
        return cls(bundle.manifest.vision, limits=limits, fast_jpeg=fast_jpeg)

    def __call__(self, data: bytes) -> np.ndarray:
        """Encoded image -> float32 [3, S, S], S = spec.image_size."""
        return self.from_image(self.decode(data))

    # --- decoding ---------------------------------------------------------------------

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> RGB image (in its own mode for convert_rgb "last"), EXIF-oriented; limits
        enforced before pixel data is decoded."""
        if not data:
            raise EmptyImage("the image is empty (0 bytes)")
        if len(data) > self.limits.max_bytes:
            raise ImageTooLarge(
                f"the image is {len(data):,} bytes, over the limit of {self.limits.max_bytes:,}"
            )
        image = _open(data)
        width, height = image.size
        if width * height > self.limits.max_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {width * height:,} pixels, over the limit "
                f"of {self.limits.max_pixels:,}"
            )
        if width == 0 or height == 0:
            raise UndecodableImage(f"the image has no pixels ({width}x{height})")
        if self.fast_jpeg and image.format in _JPEG_FORMATS:
            squash = self.spec.resize == "squash"
            target = self.spec.image_size if squash else self.spec.resize_shortest_edge
            # Keeps both sides >= target, so the shortest edge is still downscaled after.
            image.draft("RGB", (target, target))
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"the image is too large to decode: {exc}") from None
        except _DECODE_ERRORS as exc:
            raise UndecodableImage(
                f"the {image.format} image is corrupt or truncated: {exc}"
            ) from None
        image = _apply_orientation(image)
        image = _scale_16_bit(image)
        return image if self.spec.convert_rgb == "last" else _to_rgb(image)

    # --- pixels -----------------------------------------------------------------------

    def from_image(self, image: Image.Image) -> np.ndarray:
        """Exactly the image processor's pixel_values for one image: float32 [3, S, S]."""
        if self.spec.convert_rgb == "last":
            resized = self._resize_and_crop(image)
            if isinstance(resized, np.ndarray):  # zero-padded crop: only of an RGB image
                resized = self._resize_and_crop(_to_rgb(image))
            rgb = np.asarray(_drop_alpha(resized))
        else:
            rgb = np.asarray(self._resize_and_crop(_to_rgb(image)))
        out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], rgb[:, :, channel], out=out[channel])
        return out

    def _resize_and_crop(self, image: Image.Image) -> Image.Image | np.ndarray:
        crop = self.spec.image_size
        if self.spec.resize == "squash":
            if image.size == (crop, crop):
                return image
            return image.resize((crop, crop), self._resample)
        width, height = image.size
        new_width, new_height = _shortest_edge_size(width, height, self.spec.resize_shortest_edge)
        if self.spec.crop == "center_round":
            left, top = round((new_width - crop) / 2), round((new_height - crop) / 2)
        else:
            left, top = (new_width - crop) // 2, (new_height - crop) // 2
        fits = left >= 0 and top >= 0
        if fits and new_width * new_height > _MAX_RESIZE_AREA_RATIO * crop * crop:
            sx, sy = width / new_width, height / new_height
            box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
            return image.resize((crop, crop), self._resample, box=box)
        if (new_width, new_height) != image.size:
            image = image.resize((new_width, new_height), self._resample)
        if fits:
            return image.crop((left, top, left + crop, top + crop))
        return _center_crop_padded(np.asarray(image), crop)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        pass
    except _DECODE_ERRORS as exc:
        raise UndecodableImage(f"the image header is corrupt: {exc}") from None
    # Not one of ours: tell a real image in another format from bytes that are no image.
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:  # any failure here means "not an image we can name"
        found = None
    if found:
        raise UnsupportedImageFormat(
            f"{found} images are not accepted; send one of {', '.join(ACCEPTED_FORMATS)}"
        )
    raise UndecodableImage("the data is not an image in a format the server reads")


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return image  # unreadable EXIF: show the pixels as stored
    method = _ORIENTATION.get(orientation)
    return image if method is None else image.transpose(method)


def _scale_16_bit(image: Image.Image) -> Image.Image:
    if image.mode == "F":
        raise UnsupportedImageFormat("32-bit floating point images are not accepted")
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _drop_alpha(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """Pillow's convert("RGB"), as torchvision pipelines do: alpha dropped."""
    if isinstance(image, np.ndarray) or image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedImageFormat(
            f"images in mode {image.mode} are not accepted: {exc}"
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency is composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if image.mode == "RGB":
            return image
        return image.convert("RGB")
    except ValueError as exc:  # Pillow has no conversion from this mode
        raise UnsupportedImageFormat(
            f"images in mode {image.mode} are not accepted: {exc}"
        ) from None


def _shortest_edge_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): (width, height)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (shortest, new_long) if width <= height else (new_long, shortest)


def _center_crop_padded(pixels: np.ndarray, crop: int) -> np.ndarray:
    """transformers' center_crop where the crop is larger than the image: zero padding."""
    height, width = pixels.shape[:2]
    new_height, new_width = max(crop, height), max(crop, width)
    canvas = np.zeros((new_height, new_width, pixels.shape[2]), dtype=pixels.dtype)
    top_pad, left_pad = -(-(new_height - height) // 2), -(-(new_width - width) // 2)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top = (height - crop) // 2 + top_pad
    left = (width - crop) // 2 + left_pad
    return canvas[max(0, top) : top + crop, max(0, left) : left + crop]


def _normalization_table(spec: VisionSpec) -> np.ndarray:
    """[3, 256] float32: transformers' rescale (float64, then float32) and normalize (float32)."""
    levels = (np.arange(256, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None]
    table: np.ndarray = (levels[None, :] - mean) / std
    return table
