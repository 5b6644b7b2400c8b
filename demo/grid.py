"""The result grids of the demo and of `clipsearch compare --grid`: one row per query (or
per compared collection), its top hits framed green (right), red (wrong), grey (the gallery
held no more right answers) or neutral (not judged)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, UnidentifiedImageError

if TYPE_CHECKING:
    from clipsearch.client.types import Comparison, Hit

THUMB = 96
PAD = 6
LABEL_WIDTH = 300


class Mark(enum.Enum):
    RIGHT = "✓"
    WRONG = "✗"
    NONE_LEFT = "·"  # the gallery holds no more images that would be right
    UNJUDGED = " "  # nothing says what a right hit is (`clipsearch compare`)


FRAME = {
    Mark.RIGHT: (40, 170, 70),
    Mark.WRONG: (210, 40, 40),
    Mark.NONE_LEFT: (190, 190, 190),
    Mark.UNJUDGED: (120, 140, 200),
}
QUERY_FRAME = (90, 90, 90)
MISSING = (230, 230, 230)


@dataclass(frozen=True)
class GridRow:
    label: str
    query_image: Path | None
    hits: list[Path]
    marks: list[Mark]


def _thumbnail(path: Path) -> Image.Image:
    """The image at `path`, or a blank tile if it is not a readable local image (a hit's
    uri may name a remote object)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError):
        return Image.new("RGB", (THUMB, THUMB), MISSING)


def comparison_rows(
    comparison: Comparison,
    query_image: Path | None = None,
    judge: Callable[[int, Hit], Mark] | None = None,
) -> list[GridRow]:
    """One row per compared collection: its name, model and server time, then its hits
    (their uris as image paths). `judge(rank, hit)` frames each hit (default: unjudged)."""
    rows = []
    for r in comparison.results:
        hits = r.result.hits
        rows.append(
            GridRow(
                label=_ascii(f"{r.collection} [{r.model}] {r.result.timing.total_ms:.1f} ms"),
                query_image=query_image,
                hits=[Path(hit.uri) for hit in hits],
                marks=[
                    judge(rank, hit) if judge is not None else Mark.UNJUDGED
                    for rank, hit in enumerate(hits, start=1)
                ],
            )
        )
    return rows


def _ascii(label: str) -> str:
    """The default PIL font draws ASCII only."""
    return label.encode("ascii", "replace").decode("ascii")


def write_grid(path: Path, rows: list[GridRow]) -> Path:
    columns = 1 + max((len(r.hits) for r in rows), default=0)
    cell = THUMB + 2 * PAD
    width = LABEL_WIDTH + columns * cell
    grid = Image.new("RGB", (width, max(1, len(rows)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for index, row in enumerate(rows):
        top = index * cell
        draw.text((PAD, top + cell // 2 - 6), row.label, fill="black")
        if row.query_image is not None:
            left = LABEL_WIDTH
            draw.rectangle(
                (left, top, left + cell - 1, top + cell - 1), outline=QUERY_FRAME, width=3
            )
            grid.paste(_thumbnail(row.query_image), (left + PAD, top + PAD))
        for column, (hit, mark) in enumerate(zip(row.hits, row.marks, strict=True), start=1):
            left = LABEL_WIDTH + column * cell
            draw.rectangle(
                (left + 1, top + 1, left + cell - 2, top + cell - 2),
                outline=FRAME[mark],
                width=4,
            )
            grid.paste(_thumbnail(hit), (left + PAD, top + PAD))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
