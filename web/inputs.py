"""Images that arrive inside JSON: data URIs (`data:image/png;base64,...`) or bare base64."""

from __future__ import annotations

import base64
import binascii
import re

from clipsearch.client.errors import PermissionDenied
from clipsearch.web.errors import invalid

MAX_IMAGE_BYTES = 32 * 1024 * 1024
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*?(?P<b64>;base64)?,")


def is_data_uri(value: str) -> bool:
    return value[:5].lower() == "data:"


def is_image_data_uri(value: str) -> bool:
    return value[:11].lower() == "data:image/"


def decode_image(value: str, *, what: str = "image") -> bytes:
    """The bytes of an image given as a data URI or as bare base64. URLs are refused: this
    process never fetches anything on a request's behalf."""
    if value.lower().startswith(("http://", "https://", "file:", "ftp://")):
        raise PermissionDenied(
            f"{what}: URLs are not fetched; send the image as a data URI or base64"
        )
    payload = value
    if is_data_uri(value):
        match = _DATA_URI.match(value)
        if match is None or not match.group("b64"):
            raise invalid(f"{what}: a data URI must be base64-encoded (data:image/png;base64,...)")
        media_type = (match.group("type") or "").lower()
        if media_type and not media_type.startswith("image/"):
            raise invalid(f"{what}: expected an image data URI, got {media_type}")
        payload = value[match.end() :]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise invalid(f"{what} is over {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{what} is neither a base64 data URI nor base64") from None
    if not data:
        raise invalid(f"{what} is empty")
    return data


def decode_images(values: list[str], *, what: str = "images") -> list[bytes]:
    return [decode_image(value, what=f"{what}[{index}]") for index, value in enumerate(values)]
