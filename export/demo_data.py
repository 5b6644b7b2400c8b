"""The demo world: scenes of one or two coloured shapes, with English and Chinese captions.

The same renderer feeds the demo model's training (in memory, `render_array`) and the demo
gallery (`generate_gallery`: JPEG files + manifest.csv/manifest.jsonl), so what the model
learned is what the gallery shows. Pillow and numpy only: the server-side `clipsearch demo`
imports this module, and it must never pull in torch.

Everything is deterministic: scene `i` of a gallery with seed `s` depends only on (s, i), so
a gallery of n images is a prefix of a gallery of n + k images with the same seed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Shape:
    name: str
    en: str
    zh: str
    # Circumradius relative to the object's size, chosen so that shapes cover similar areas.
    extent: float


@dataclass(frozen=True)
class Colour:
    name: str
    en: str
    zh: str
    rgb: tuple[int, int, int]


SHAPES: tuple[Shape, ...] = (
    Shape("circle", "circle", "圆形", 0.92),
    Shape("square", "square", "正方形", 1.0),
    Shape("triangle", "triangle", "三角形", 1.18),
    Shape("star", "star", "五角星", 1.2),
)
COLOURS: tuple[Colour, ...] = (
    Colour("red", "red", "红色", (220, 35, 35)),
    Colour("green", "green", "绿色", (30, 165, 55)),
    Colour("blue", "blue", "蓝色", (35, 75, 225)),
    Colour("yellow", "yellow", "黄色", (245, 210, 25)),
    Colour("purple", "purple", "紫色", (140, 50, 190)),
    Colour("orange", "orange", "橙色", (250, 135, 15)),
)
SHAPE_BY_NAME = {s.name: s for s in SHAPES}
COLOUR_BY_NAME = {c.name: c for c in COLOURS}

DEFAULT_IMAGE_SIZE = 128
DEFAULT_TWO_OBJECT_FRACTION = 0.3
JPEG_QUALITY = 90
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
_BACKGROUND_KINDS = ("solid", "gradient", "noisy")
_SINGLE_OBJECT_SIZES = (0.25, 0.40)
_TWO_OBJECT_SIZES = (0.14, 0.20)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    rgb: tuple[int, int, int]  # the colour's RGB with a small per-object jitter
    cx: float  # centre, as a fraction of the image side
    cy: float
    size: float  # radius as a fraction of the image side (times the shape's extent)
    rotation: float  # radians

    @property
    def extent(self) -> float:
        return self.size * SHAPE_BY_NAME[self.shape].extent


@dataclass(frozen=True)
class Background:
    kind: str  # "solid" | "gradient" | "noisy"
    rgb_a: tuple[int, int, int]
    rgb_b: tuple[int, int, int]
    angle: float  # direction of the gradient, radians
    noise_seed: int

    @property
    def brightness(self) -> str:
        mean = (sum(self.rgb_a) + sum(self.rgb_b)) / 6
        return "light" if mean >= 128 else "dark"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(colour, shape) per object, in caption order."""
        return tuple((o.colour, o.shape) for o in self.objects)

    @property
    def caption_en(self) -> str:
        return caption_text(self.pairs, "en")

    @property
    def caption_zh(self) -> str:
        return caption_text(self.pairs, "zh")

    @property
    def key(self) -> frozenset[tuple[str, str]]:
        """What the scene shows, regardless of layout: its set of (colour, shape)."""
        return frozenset((o.colour, o.shape) for o in self.objects)


def indefinite_article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class GalleryItem:
    id: str
    path: str  # relative to the gallery directory
    caption_en: str
    caption_zh: str
    shape: str
    colour: str
    shape2: str  # "" for single-object scenes
    colour2: str
    n_objects: int
    background: str  # "light" | "dark"
    width: int
    height: int

    def to_row(self) -> dict[str, str | int]:
        return asdict(self)


MANIFEST_COLUMNS = tuple(GalleryItem.__dataclass_fields__)


# --- captions ---------------------------------------------------------------------------
# The gallery's captions are the first template of each list; training draws from all of
# them, so queries phrased in any of these ways find the same images.

EN_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle",),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star", "five-pointed star"),
}
ZH_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("圆形", "圆"),
    "square": ("正方形", "方形", "方块"),
    "triangle": ("三角形",),
    "star": ("五角星", "星星", "星形"),
}
# {obj}: "a red circle" / "an orange star"; {c}: colour; {s}: shape.
EN_SINGLE_TEMPLATES = (
    "{obj}",
    "{c} {s}",
    "a photo of {obj}",
    "a picture of {obj}",
    "an image of {obj}",
    "the {c} {s}",
    "one {c} {s}",
    "{obj} on a plain background",
    "a drawing of {obj}",
    "a {s} that is {c}",
    "a {c} shape: a {s}",
)
EN_PAIR_TEMPLATES = (
    "{obj1} and {obj2}",
    "{c1} {s1} and {c2} {s2}",
    "a photo of {obj1} and {obj2}",
    "{obj1} next to {obj2}",
    "two shapes: {obj1} and {obj2}",
    "a picture with {obj1} and {obj2}",
)
ZH_SINGLE_TEMPLATES = (
    "{c}的{s}",
    "{c}{s}",
    "一个{c}的{s}",
    "一张{c}的{s}的图片",
    "图片里有一个{c}的{s}",
    "{c}的{s}的照片",
    "这是一个{c}的{s}",
)
ZH_PAIR_TEMPLATES = (
    "{c1}的{s1}和{c2}的{s2}",
    "一个{c1}的{s1}和一个{c2}的{s2}",
    "{c1}{s1}和{c2}{s2}",
    "图片里有{c1}的{s1}和{c2}的{s2}",
    "{c1}的{s1}旁边有{c2}的{s2}",
)


def caption_text(
    objects: tuple[tuple[str, str], ...], language: str, rng: np.random.Generator | None = None
) -> str:
    """A caption of (colour, shape) objects: canonical without rng, a random variant with it.

    With rng, the template, the synonyms and (for two objects) the order are drawn from it.
    """
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"captions describe one or two objects, got {len(objects)}")
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    if rng is not None and len(objects) == 2 and rng.random() < 0.5:
        objects = (objects[1], objects[0])
    words = EN_SHAPE_WORDS if language == "en" else ZH_SHAPE_WORDS
    fields: dict[str, str] = {}
    for i, (colour, shape) in enumerate(objects, start=1):
        synonyms = words[shape]
        s = synonyms[_index(rng, len(synonyms))] if rng is not None else synonyms[0]
        c = COLOUR_BY_NAME[colour].en if language == "en" else COLOUR_BY_NAME[colour].zh
        suffix = "" if len(objects) == 1 else str(i)
        fields["c" + suffix], fields["s" + suffix] = c, s
        fields["obj" + suffix] = f"{indefinite_article(c)} {c} {s}"
    templates: tuple[str, ...]
    if language == "en":
        templates = EN_SINGLE_TEMPLATES if len(objects) == 1 else EN_PAIR_TEMPLATES
    else:
        templates = ZH_SINGLE_TEMPLATES if len(objects) == 1 else ZH_PAIR_TEMPLATES
    template = templates[_index(rng, len(templates))] if rng is not None else templates[0]
    return template.format(**fields)


# --- sampling ---------------------------------------------------------------------------


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


# Scalar draws go through rng.random(): it costs a third of rng.uniform/integers per call,
# and training renders hundreds of thousands of scenes.
def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _index(rng: np.random.Generator, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


def sample_scene(
    rng: np.random.Generator,
    two_object_fraction: float = DEFAULT_TWO_OBJECT_FRACTION,
    colours: Sequence[Colour] = COLOURS,
) -> Scene:
    """A random scene; its objects take their colours from `colours`."""
    background = _sample_background(rng)
    objects: tuple[SceneObject, ...]
    if rng.random() < two_object_fraction:
        objects = _sample_two_objects(rng, colours)
    else:
        objects = (_sample_object(rng, _SINGLE_OBJECT_SIZES, colours),)
    return Scene(objects=objects, background=background)


def _sample_background(rng: np.random.Generator) -> Background:
    # Low saturation keeps the background from ever looking like one of the named colours.
    def muted(value: float) -> tuple[int, int, int]:
        hue = rng.random()
        saturation = _uniform(rng, 0.0, 0.12)
        return _hsv_to_rgb(hue, saturation, value)

    value = _uniform(rng, 0.08, 0.95)
    other = min(max(value + _uniform(rng, -0.3, 0.3), 0.05), 0.97)
    draw = rng.random()
    kind = "solid" if draw < 0.3 else "gradient" if draw < 0.75 else "noisy"
    return Background(
        kind=kind,
        rgb_a=muted(value),
        rgb_b=muted(other) if kind != "solid" else muted(value),
        angle=_uniform(rng, 0, 2 * math.pi),
        noise_seed=_index(rng, 2**31 - 1),
    )


def _sample_object(
    rng: np.random.Generator,
    size_range: tuple[float, float],
    colours: Sequence[Colour],
    shape: Shape | None = None,
    colour: Colour | None = None,
) -> SceneObject:
    shape = shape or SHAPES[_index(rng, len(SHAPES))]
    colour = colour or colours[_index(rng, len(colours))]
    size = _uniform(rng, *size_range)
    margin = size * shape.extent + 0.02
    r, g, b = (min(max(c + _index(rng, 29) - 14, 0), 255) for c in colour.rgb)
    return SceneObject(
        shape=shape.name,
        colour=colour.name,
        rgb=(r, g, b),
        cx=_uniform(rng, margin, 1 - margin),
        cy=_uniform(rng, margin, 1 - margin),
        size=size,
        rotation=_uniform(rng, 0, 2 * math.pi),
    )


def _sample_two_objects(
    rng: np.random.Generator, colours: Sequence[Colour]
) -> tuple[SceneObject, SceneObject]:
    first = _sample_object(rng, _TWO_OBJECT_SIZES, colours)
    while True:
        shape = SHAPES[_index(rng, len(SHAPES))]
        colour = colours[_index(rng, len(colours))]
        if (colour.name, shape.name) != (first.colour, first.shape):
            break
    second = _sample_object(rng, _TWO_OBJECT_SIZES, colours, shape=shape, colour=colour)
    e1, e2 = first.extent + 0.02, second.extent + 0.02
    # Pick a direction, then a position of the pair along it where both objects fit.
    while True:
        angle = _uniform(rng, 0, 2 * math.pi)
        dx, dy = (e1 + e2 + 0.02) * math.cos(angle), (e1 + e2 + 0.02) * math.sin(angle)
        x_lo, x_hi = max(e1, e2 - dx), min(1 - e1, 1 - e2 - dx)
        y_lo, y_hi = max(e1, e2 - dy), min(1 - e1, 1 - e2 - dy)
        if x_lo < x_hi and y_lo < y_hi:
            break
    x, y = _uniform(rng, x_lo, x_hi), _uniform(rng, y_lo, y_hi)
    first = replace(first, cx=x, cy=y)
    second = replace(second, cx=x + dx, cy=y + dy)
    # Captions name objects in reading order: left to right, then top to bottom.
    ordered = sorted((first, second), key=lambda o: (round(o.cx, 1), o.cy))
    return ordered[0], ordered[1]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]
    return round(r * 255), round(g * 255), round(b * 255)


# --- rendering --------------------------------------------------------------------------


def render_array(scene: Scene, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 RGB [size, size, 3]."""
    # Channels first while compositing: numpy broadcasts a colour over [3, H, W] far faster
    # than over the short last axis of [H, W, 3].
    image = _render_background(scene.background, size)
    for obj in scene.objects:
        alpha = _object_mask(obj, size)
        colour = np.asarray(obj.rgb, dtype=np.float32)[:, None, None]
        image += (colour - image) * alpha
    image += 0.5
    np.clip(image, 0, 255, out=image)
    return np.ascontiguousarray(image.astype(np.uint8).transpose(1, 2, 0))


def render_scene(scene: Scene, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    return Image.fromarray(render_array(scene, size), mode="RGB")


def _render_background(background: Background, size: int) -> np.ndarray:
    """float32 [3, size, size]."""
    a = np.asarray(background.rgb_a, dtype=np.float32)[:, None, None]
    if background.kind == "solid":
        return np.repeat(np.repeat(a, size, axis=1), size, axis=2)
    b = np.asarray(background.rgb_b, dtype=np.float32)[:, None, None]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    along = np.add.outer(math.sin(background.angle) * coords, math.cos(background.angle) * coords)
    t = np.clip(along * math.sqrt(2.0) + 0.5, 0.0, 1.0)
    image = a + (b - a) * t
    if background.kind == "noisy":
        tile = _noise_tile(size)
        x, y = (
            background.noise_seed % (size + 1),
            (background.noise_seed // (size + 1)) % (size + 1),
        )
        image += tile[y : y + size, x : x + size]
    return image


@functools.lru_cache(maxsize=8)
def _noise_tile(size: int) -> np.ndarray:
    """Grain for "noisy" backgrounds: one fixed tile per image size, cut at an offset."""
    tile = np.random.default_rng(size).normal(0.0, 7.0, (2 * size, 2 * size))
    return tile.astype(np.float32)


def _object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Coverage of the object per pixel, float32 in [0, 1]."""
    canvas = size * _SUPERSAMPLE
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, radius = obj.cx * canvas, obj.cy * canvas, obj.extent * canvas
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, radius, obj.rotation), fill=255)
    small = mask.reduce(_SUPERSAMPLE)
    return np.asarray(small, dtype=np.float32) * (1.0 / 255.0)


def _polygon(
    shape: str, cx: float, cy: float, radius: float, rotation: float
) -> list[tuple[float, float]]:
    if shape == "square":
        radii, angles = [radius] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == "triangle":
        radii, angles = [radius] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif shape == "star":
        # An inner radius of 0.45 (a regular star has 0.38) keeps the points visible at 64 px.
        radii = [radius if k % 2 == 0 else radius * 0.45 for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (cx + r * math.cos(a + rotation), cy + r * math.sin(a + rotation))
        for r, a in zip(radii, angles, strict=True)
    ]


# --- the gallery ------------------------------------------------------------------------


def generate_gallery(
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int = DEFAULT_IMAGE_SIZE,
    two_object_fraction: float = DEFAULT_TWO_OBJECT_FRACTION,
) -> list[GalleryItem]:
    """Write n JPEG scenes under out/images plus out/manifest.csv and out/manifest.jsonl."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(n):
        scene = sample_scene(scene_rng(seed, index), two_object_fraction)
        item = gallery_item(scene, index, seed, size)
        (out / item.path).write_bytes(encode_jpeg(render_scene(scene, size)))
        items.append(item)
    write_manifests(out, items)
    return items


def gallery_item(scene: Scene, index: int, seed: int, size: int) -> GalleryItem:
    item_id = f"demo-{seed}-{index:06d}"
    first = scene.objects[0]
    second = scene.objects[1] if len(scene.objects) > 1 else None
    return GalleryItem(
        id=item_id,
        path=f"images/{item_id}.jpg",
        caption_en=scene.caption_en,
        caption_zh=scene.caption_zh,
        shape=first.shape,
        colour=first.colour,
        shape2=second.shape if second else "",
        colour2=second.colour if second else "",
        n_objects=len(scene.objects),
        background=scene.background.brightness,
        width=size,
        height=size,
    )


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_manifests(out: Path, items: list[GalleryItem]) -> None:
    with (out / "manifest.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for item in items:
            writer.writerow(item.to_row())
    with (out / "manifest.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_row(), ensure_ascii=False) + "\n")


def read_manifest(out: str | Path) -> list[GalleryItem]:
    """The items of a gallery written by `generate_gallery`, from its manifest.jsonl."""
    lines = (Path(out) / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [GalleryItem(**json.loads(line)) for line in lines if line]


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    items = generate_gallery(args.out, args.n, seed=args.seed, size=args.size)
    seconds = time.perf_counter() - started
    print(
        f"wrote {len(items)} images and manifest.csv/manifest.jsonl to {args.out} "
        f"in {seconds:.1f} s",
        file=sys.stderr,
    )
    return 0
