"""Thumbnails of stored items, read only from one configured folder (the media root).

A hit's `uri` is whatever its ingest recorded: an absolute path on the server's machine, a
path relative to the gallery, a `file://` or an `http(s)://` URI. The web process shows an
image only when the uri names a regular file that is inside the media root after every
symlink is resolved; anything with a scheme is refused and never fetched, so a stored uri
cannot make this process read arbitrary files or reach the network.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipsearch.client.errors import ClipsearchError, NotFound, PermissionDenied
from clipsearch.web.errors import invalid

THUMBNAIL_SIZES = (64, 128, 256, 512)
DEFAULT_THUMBNAIL_SIZE = 256
# A source image larger than this is not decoded for a thumbnail.
MAX_SOURCE_BYTES = 64 * 1024 * 1024
MAX_SOURCE_PIXELS = 64_000_000
JPEG_QUALITY = 85


class MediaRoot:
    """Resolves uris to files inside `root`; every refusal is a typed client error."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        resolved = Path(root).resolve(strict=True)
        if not resolved.is_dir():
            raise NotADirectoryError(f"media root {root} is not a directory")
        self.root = resolved

    def resolve(self, uri: str) -> Path:
        if not uri or "\x00" in uri:
            raise invalid("a thumbnail needs a uri without NUL characters")
        if "://" in uri or uri.lower().startswith(("file:", "http:", "https:", "data:")):
            raise PermissionDenied(f"only files under the media root are shown, not {uri!r}")
        path = Path(uri)
        candidate = path if path.is_absolute() else self.root / path
        try:
            resolved = candidate.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            if not _lexically_inside(candidate, self.root):
                raise PermissionDenied(f"{uri!r} is outside the media root") from None
            raise NotFound(f"no file {uri!r} under the media root") from None
        except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
            raise invalid(f"cannot resolve {uri!r}: {exc}") from None
        if not resolved.is_relative_to(self.root):
            raise PermissionDenied(f"{uri!r} is outside the media root")
        if not resolved.is_file():
            raise NotFound(f"{uri!r} is not a file under the media root")
        return resolved

    def contains(self, uri: str) -> bool:
        """Whether `uri` names a file this root serves (for the thumbnail link of a hit)."""
        try:
            self.resolve(uri)
        except ClipsearchError:
            return False
        return True


def _lexically_inside(path: Path, root: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(root)


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str


class ThumbnailCache:
    """Resized images by (file, modification time, size), least recently used dropped first
    once the cache holds more than `max_bytes`. Safe to use from several threads."""

    def __init__(self, media: MediaRoot, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.media = media
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int, int], Thumbnail] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, uri: str, size: int = DEFAULT_THUMBNAIL_SIZE) -> Thumbnail:
        if size not in THUMBNAIL_SIZES:
            raise invalid(f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        path = self.media.resolve(uri)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, size)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        if stat.st_size > MAX_SOURCE_BYTES:
            raise invalid(f"{uri!r} is over {MAX_SOURCE_BYTES // 2**20} MiB")
        thumbnail = make_thumbnail(path, size)
        with self._lock:
            if key not in self._entries and len(thumbnail.data) <= self.max_bytes:
                self._entries[key] = thumbnail
                self.bytes += len(thumbnail.data)
                while self.bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self.bytes -= len(dropped.data)
        return thumbnail


def make_thumbnail(path: Path, size: int) -> Thumbnail:
    """The image at `path` shrunk to fit `size` x `size` (never enlarged): JPEG, or PNG when
    it has transparency."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_SOURCE_PIXELS:
                raise invalid(f"{path.name} has over {MAX_SOURCE_PIXELS} pixels")
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            image.thumbnail((size, size))
            transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            out = io.BytesIO()
            if transparent:
                image.convert("RGBA").save(out, "PNG", optimize=True)
                return Thumbnail(out.getvalue(), "image/png")
            image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
            return Thumbnail(out.getvalue(), "image/jpeg")
    except (OSError, Image.DecompressionBombError) as exc:
        raise invalid(f"{path.name} is not a readable image: {exc}") from None
