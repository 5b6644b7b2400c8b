"""The committed Chinese-CLIP demo model (server/models/demo-zh) means what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch.export import demo_data, demo_eval
from clipsearch.server.bundle import committed_bundle_path, load_bundle
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder

GALLERY_SEED = 2024  # a held-out seed: training never renders these scenes
GALLERY_SIZE = 60
QUERIES = [
    ("a red circle", ("red", "circle")),
    ("红色的圆形", ("red", "circle")),
    ("blue square", ("blue", "square")),
    ("一个黄色的五角星", ("yellow", "star")),
    ("a purple triangle", ("purple", "triangle")),
    ("蓝色的五角星", ("blue", "star")),
    ("紫色的方块", ("purple", "square")),
]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[demo_data.GalleryItem]]:
    out = tmp_path_factory.mktemp("demo-zh-gallery")
    items = demo_data.generate_gallery(out, GALLERY_SIZE, seed=GALLERY_SEED)
    return out, items


def _objects(item: demo_data.GalleryItem) -> set[tuple[str, str]]:
    found = {(item.colour, item.shape)}
    if item.n_objects == 2:
        found.add((item.colour2, item.shape2))
    return found


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_text_to_image_top_hit_has_the_described_colour_and_shape(
    gallery: tuple[Path, list[demo_data.GalleryItem]], precision: str
) -> None:
    out, items = gallery
    encoder = OnnxEncoder(
        load_bundle(committed_bundle_path("demo-zh")),
        EncoderOptions(precision=precision, warmup=False),
    )
    images = encoder.encode_images(
        [encoder.preprocessor((out / item.path).read_bytes()) for item in items]
    )
    texts = encoder.encode_text([q for q, _ in QUERIES])
    for (query, wanted), scores in zip(QUERIES, texts @ images.T, strict=True):
        singles = [i for i in items if i.n_objects == 1 and (i.colour, i.shape) == wanted]
        assert singles, f"the test gallery should hold a single {wanted}"
        ranked = [items[i] for i in np.argsort(-scores, kind="stable")]
        assert wanted in _objects(ranked[0]), (query, [i.caption_en for i in ranked[:3]])
        top = ranked[: len(singles)]
        assert sum(wanted in _objects(i) for i in top) >= len(singles) - 1, query


def test_english_and_chinese_captions_of_one_scene_agree() -> None:
    encoder = OnnxEncoder(
        load_bundle(committed_bundle_path("demo-zh")), EncoderOptions(warmup=False)
    )
    pairs = demo_eval.all_pairs()
    english = encoder.encode_text([demo_data.caption_text((p,), "en") for p in pairs])
    chinese = encoder.encode_text([demo_data.caption_text((p,), "zh") for p in pairs])
    # Each Chinese caption's nearest English caption describes the same colour and shape.
    assert (np.argmax(chinese @ english.T, axis=1) == np.arange(len(pairs))).mean() >= 0.9


def test_committed_model_is_chinese_clip_and_records_its_held_out_figures() -> None:
    manifest = load_bundle(committed_bundle_path("demo-zh")).manifest
    assert manifest.family == "chinese-clip"
    assert manifest.text.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert (manifest.vision.resize, manifest.vision.crop) == ("squash", "none")
    assert set(manifest.variants) == {"fp32", "int8"}
    for precision in ("fp32", "int8"):
        figures = {
            k.removeprefix(precision + "."): v
            for k, v in manifest.evaluation.items()
            if k.startswith(precision + ".")
        }
        assert demo_eval.misses(figures) == [], precision


def test_committed_bundle_is_small() -> None:
    root = committed_bundle_path("demo-zh")
    total = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    assert total < 15 * 1024 * 1024
