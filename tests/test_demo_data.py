"""The demo gallery generator and the demo tokenizer (no torch, no model)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.export import demo_data, demo_tokenizer
from clipsearch.export.demo_data import COLOUR_BY_NAME, SHAPE_BY_NAME, GalleryItem


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[GalleryItem]]:
    out = tmp_path_factory.mktemp("gallery")
    return out, demo_data.generate_gallery(out, 40, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes(
    gallery: tuple[Path, list[GalleryItem]], tmp_path: Path
) -> None:
    out, items = gallery
    again = demo_data.generate_gallery(tmp_path, 40, seed=7)
    assert again == items
    assert _files(tmp_path) == _files(out)


def test_other_seed_gives_other_scenes(
    gallery: tuple[Path, list[GalleryItem]], tmp_path: Path
) -> None:
    _, items = gallery
    other = demo_data.generate_gallery(tmp_path, 40, seed=8)
    assert [i.caption_en for i in other] != [i.caption_en for i in items]
    assert all(i.id.startswith("demo-8-") for i in other)


def test_a_smaller_gallery_is_a_prefix_of_a_larger_one(
    gallery: tuple[Path, list[GalleryItem]], tmp_path: Path
) -> None:
    out, items = gallery
    small = demo_data.generate_gallery(tmp_path, 5, seed=7)
    assert small == items[:5]
    for item in small:
        assert (tmp_path / item.path).read_bytes() == (out / item.path).read_bytes()


def test_manifests_have_the_columns_and_agree(gallery: tuple[Path, list[GalleryItem]]) -> None:
    out, items = gallery
    with (out / "manifest.csv").open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == demo_data.MANIFEST_COLUMNS
        rows = list(reader)
    assert demo_data.MANIFEST_COLUMNS[:6] == (
        "id",
        "path",
        "caption_en",
        "caption_zh",
        "shape",
        "colour",
    )
    assert {"shape2", "colour2", "n_objects"} <= set(demo_data.MANIFEST_COLUMNS)
    jsonl = [json.loads(line) for line in (out / "manifest.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == len(jsonl) == len(items) == 40
    for row, record, item in zip(rows, jsonl, items, strict=True):
        assert record == item.to_row()
        assert row == {k: str(v) for k, v in item.to_row().items()}
    assert demo_data.read_manifest(out) == items
    assert len({i.id for i in items}) == 40


def test_captions_match_shapes_and_colours(gallery: tuple[Path, list[GalleryItem]]) -> None:
    _, items = gallery
    assert {i.n_objects for i in items} == {1, 2}
    for item in items:
        first = f"{COLOUR_BY_NAME[item.colour].en} {SHAPE_BY_NAME[item.shape].en}"
        first_zh = f"{COLOUR_BY_NAME[item.colour].zh}的{SHAPE_BY_NAME[item.shape].zh}"
        if item.n_objects == 1:
            assert item.shape2 == item.colour2 == ""
            assert re.fullmatch(rf"an? {first}", item.caption_en)
            assert item.caption_zh == first_zh
        else:
            second = f"{COLOUR_BY_NAME[item.colour2].en} {SHAPE_BY_NAME[item.shape2].en}"
            second_zh = f"{COLOUR_BY_NAME[item.colour2].zh}的{SHAPE_BY_NAME[item.shape2].zh}"
            assert re.fullmatch(rf"an? {first} and an? {second}", item.caption_en)
            assert item.caption_zh == f"{first_zh}和{second_zh}"
            assert (item.colour, item.shape) != (item.colour2, item.shape2)


def test_articles() -> None:
    assert demo_data.caption_text((("orange", "star"),), "en") == "an orange star"
    assert demo_data.caption_text((("red", "circle"),), "en") == "a red circle"
    assert demo_data.caption_text((("red", "circle"),), "zh") == "红色的圆形"
    pair = (("red", "circle"), ("blue", "square"))
    assert demo_data.caption_text(pair, "en") == "a red circle and a blue square"
    assert demo_data.caption_text(pair, "zh") == "红色的圆形和蓝色的正方形"


def test_jpegs_decode_at_the_stated_size(gallery: tuple[Path, list[GalleryItem]]) -> None:
    out, items = gallery
    for item in items:
        with Image.open(out / item.path) as image:
            assert image.format == "JPEG"
            assert image.size == (item.width, item.height) == (128, 128)
            image.load()


def test_the_shape_is_where_the_scene_says_in_its_colour() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        scene = demo_data.sample_scene(rng, two_object_fraction=0.0)
        obj = scene.objects[0]
        pixels = demo_data.render_array(scene, 128).astype(int)
        centre = pixels[int(obj.cy * 128), int(obj.cx * 128)]
        assert np.abs(centre - np.array(obj.rgb)).max() <= 2
        assert np.abs(pixels[0, 0] - np.array(obj.rgb)).max() > 30  # a corner is background


def test_shapes_are_large_in_the_frame() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        scene = demo_data.sample_scene(rng, two_object_fraction=0.0)
        obj = scene.objects[0]
        assert obj.extent >= 0.25 * 0.9
        assert obj.extent <= min(obj.cx, obj.cy, 1 - obj.cx, 1 - obj.cy)


def test_two_objects_never_overlap() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        a, b = demo_data.sample_scene(rng, two_object_fraction=1.0).objects
        assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.extent + b.extent
        assert (a.colour, a.shape) != (b.colour, b.shape)


def test_random_caption_variants_keep_the_meaning() -> None:
    rng = np.random.default_rng(6)
    for _ in range(100):
        text = demo_data.caption_text((("purple", "star"),), "en", rng)
        assert "purple" in text
        assert "star" in text
        text_zh = demo_data.caption_text((("purple", "star"),), "zh", rng)
        assert "紫色" in text_zh
        assert any(w in text_zh for w in demo_data.ZH_SHAPE_WORDS["star"])


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be"):
        demo_data.generate_gallery(tmp_path, -1)
    with pytest.raises(ValueError, match="one or two objects"):
        demo_data.caption_text((), "en")
    with pytest.raises(ValueError, match="language"):
        demo_data.caption_text((("red", "circle"),), "fr")


def test_cli_writes_a_gallery(tmp_path: Path) -> None:
    from clipsearch.cli import main

    assert main(["demo-data", "--out", str(tmp_path), "--n", "3", "--seed", "2"]) == 0
    assert [i.id for i in demo_data.read_manifest(tmp_path)] == [
        "demo-2-000000",
        "demo-2-000001",
        "demo-2-000002",
    ]


def test_module_imports_without_torch() -> None:
    code = (
        "import sys; import clipsearch.export.demo_data; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rendering_is_fast_enough_for_training() -> None:
    import time

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(200):
        demo_data.render_array(demo_data.sample_scene(rng), 64)
    # Hundreds per second even on a busy shared core (measured ~2,400/s at 64 px when idle).
    assert 200 / (time.perf_counter() - started) > 200


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_layout() -> None:
    vocab, merges = demo_tokenizer.build_vocab_and_merges()
    assert vocab[demo_tokenizer.EOS_TOKEN] == len(vocab) - 1
    assert vocab[demo_tokenizer.BOS_TOKEN] == len(vocab) - 2
    byte_chars = list(demo_tokenizer.bytes_to_unicode().values())
    assert [t for t, i in sorted(vocab.items(), key=lambda x: x[1])][:512] == byte_chars + [
        c + "</w>" for c in byte_chars
    ]
    assert all(a + b in vocab for a, b in merges)


def test_every_caption_word_and_character_is_one_token() -> None:
    tokenizer = demo_tokenizer.build_demo_tokenizer()
    english, chinese = demo_tokenizer.caption_vocabulary()
    for word in english:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    sentence = "".join(chinese)
    assert len(tokenizer(sentence)["input_ids"]) == len(chinese) + 2
    assert tokenizer.decode(tokenizer(sentence)["input_ids"], skip_special_tokens=True) == sentence


def test_any_text_tokenizes_and_round_trips() -> None:
    tokenizer = demo_tokenizer.build_demo_tokenizer()
    for text in ["zebra crossing", "猫和狗", "émoji 🙂!", "数字 7", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_tokenizer_files_load_in_clip_tokenizer(tmp_path: Path) -> None:
    from transformers import CLIPTokenizerFast

    demo_tokenizer.write_tokenizer_files(tmp_path)
    loaded = CLIPTokenizerFast.from_pretrained(tmp_path)
    built = demo_tokenizer.build_demo_tokenizer()
    text = "一个红色的圆形 and a blue square"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.eos_token_id == len(loaded) - 1
    assert built.model_max_length == 77


def test_server_tokenizer_reads_the_saved_tokenizer(tmp_path: Path) -> None:
    from clipsearch.server.bundle import TextSpec
    from clipsearch.server.text import TextTokenizer

    built = demo_tokenizer.build_demo_tokenizer()
    built.save_pretrained(tmp_path)
    spec = TextSpec(
        context_length=77,
        bos_id=built.bos_token_id,
        eos_id=built.eos_token_id,
        pad_id=built.pad_token_id,
    )
    server = TextTokenizer(tmp_path / "tokenizer.json", spec)
    for text in ["红色的圆形和蓝色的正方形", "a photo of an orange star", "x" * 300]:
        ids = server.tokenize([text])[0].ids.tolist()
        assert ids == built(text, truncation=True, max_length=77)["input_ids"]


def test_jpeg_encoding_is_deterministic() -> None:
    scene = demo_data.sample_scene(demo_data.scene_rng(0, 0))
    image = demo_data.render_scene(scene)
    assert demo_data.encode_jpeg(image) == demo_data.encode_jpeg(image)
    assert Image.open(io.BytesIO(demo_data.encode_jpeg(image))).size == (128, 128)
