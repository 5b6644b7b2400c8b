"""The demo's result grid: one row per query, its top hits framed green (right), red
(wrong) or grey (the gallery held no more right answers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

THUMB = 96
PAD = 6
LABEL_WIDTH = 300


class Mark(enum.Enum):
    RIGHT = "✓"
    WRONG = "✗"
    NONE_LEFT = "·"  # the gallery holds no more images that would be right


FRAME = {Mark.RIGHT: (40, 170, 70), Mark.WRONG: (210, 40, 40), Mark.NONE_LEFT: (190, 190, 190)}
QUERY_FRAME = (90, 90, 90)


@dataclass(frozen=True)
class GridRow:
    label: str
    query_image: Path | None
    hits: list[Path]
    marks: list[Mark]


def _thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BICUBIC)


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
