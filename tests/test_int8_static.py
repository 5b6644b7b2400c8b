"""int8-static: calibrated at export, batch-invariant, served by default on CPU.

The tiny random CLIP of export_fixtures (exported with every precision, int8-static included)
carries the gates; the refusal path, a user's calibration set and the server's choice of
variant (a real server on port 0, asked through Info) are checked here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import export_fixtures
import grpc
import numpy as np
import pytest
from server_fixtures import ThreadedServer, quick_settings

from clipsearch.server.bundle import (
    BATCH_INVARIANCE_MIN_COSINE,
    PARITY_BARS,
    Bundle,
    load_bundle,
)
from clipsearch.server.encoder import choose_precision
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

onnx = pytest.importorskip("onnx", reason="export needs the [export] extra")
pytest.importorskip("torch", reason="export needs the [export] extra")

from clipsearch.export import calibration, exporter  # noqa: E402
from clipsearch.export.demo_data import generate_gallery  # noqa: E402
from clipsearch.export.parity import OnnxTowers  # noqa: E402

# 32 texts and lengths from 3 to 77 tokens: none of them is in the export's own check.
BATCH_TEXTS = [
    " ".join(["a small green triangle next to a cup"] * (1 + i % 9))[: 8 + 13 * i]
    for i in range(32)
]


def quiet(message: str) -> None:
    del message


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_fixtures.tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(export_fixtures.tiny_bundle(tmp_path_factory))


def towers(bundle: Bundle, precision: str) -> OnnxTowers:
    variant = bundle.variant(precision)
    return OnnxTowers.load(
        bundle.path(variant.text_file),
        bundle.path(variant.vision_file),
        bundle.tokenizer_path,
        bundle.manifest.text,
        bundle.manifest.vision,
    )


def normalized(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def alone_vs_batch(encode: Any, items: Any) -> float:
    batch = normalized(encode(items))
    singles = normalized(np.concatenate([encode(items[i : i + 1]) for i in range(len(items))]))
    return float(np.sum(batch * singles, axis=1).min())


def random_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


# --- the gates ----------------------------------------------------------------------------


def test_manifest_records_parity_invariance_and_how_it_was_made(bundle: Bundle) -> None:
    variant = bundle.manifest.variants["int8-static"]
    assert (variant.text_file, variant.vision_file) == (
        "text.int8-static.onnx",
        "vision.int8-static.onnx",
    )
    assert variant.text_parity.min_cosine >= PARITY_BARS["int8-static"] == 0.99
    assert variant.vision_parity.min_cosine >= 0.99
    assert variant.batch_invariance["batch_size"] == 32
    assert variant.batch_invariance["text_min_cosine"] >= BATCH_INVARIANCE_MIN_COSINE == 0.99999
    assert variant.batch_invariance["vision_min_cosine"] >= 0.99999
    assert variant.is_batch_invariant()
    # Dynamic int8 is measured too, and is not batch-invariant: that is why it is opt-in.
    assert not bundle.manifest.variants["int8"].is_batch_invariant()
    assert variant.quantization["method"] == "percentile 99.999"
    assert variant.quantization["weights"] == "int8 per channel, 7-bit (reduce_range)"
    assert variant.quantization["calibration"] == "built-in (seed 0xca11b): 64 images, 114 texts"


def test_a_vector_does_not_depend_on_its_batch_mates(bundle: Bundle) -> None:
    static, dynamic = towers(bundle, "int8-static"), towers(bundle, "int8")
    pixels = random_pixels(32, seed=5)
    assert alone_vs_batch(static.encode_texts, BATCH_TEXTS) >= 0.99999
    assert alone_vs_batch(static.run_vision, pixels) >= 0.99999
    # The same check tells dynamic quantization apart: its scales follow the batch.
    assert alone_vs_batch(dynamic.encode_texts, BATCH_TEXTS) < 0.99999


def test_int8_static_stays_close_to_fp32_on_fresh_inputs(bundle: Bundle) -> None:
    static, fp32 = towers(bundle, "int8-static"), towers(bundle, "fp32")
    pixels = random_pixels(16, seed=6)
    text_cos = np.sum(
        normalized(static.encode_texts(BATCH_TEXTS)) * normalized(fp32.encode_texts(BATCH_TEXTS)),
        axis=1,
    )
    image_cos = np.sum(
        normalized(static.run_vision(pixels)) * normalized(fp32.run_vision(pixels)), axis=1
    )
    assert text_cos.min() >= 0.99
    assert image_cos.min() >= 0.99


def test_scales_are_fixed_and_norms_softmax_projection_stay_fp32(bundle: Bundle) -> None:
    graph = onnx.load(str(bundle.path("text.int8-static.onnx"))).graph
    ops = [node.op_type for node in graph.node]
    assert "DynamicQuantizeLinear" not in ops and "QuantizeLinear" in ops
    constants = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            assert node.input[1] in constants and node.input[2] in constants  # static scale
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        fed_by = {producers[i].op_type for i in node.input if i in producers}
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert "DequantizeLinear" not in fed_by, node.name
    projection = exporter_projection(graph)
    assert projection.input[1] in constants  # fp32 weights, no DequantizeLinear in front
    assert producers[projection.input[0]].op_type != "DequantizeLinear"
    quantized_matmuls = [
        n
        for n in graph.node
        if n.op_type == "MatMul"
        and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    assert len(quantized_matmuls) == 16  # 2 layers x (q, k, v, out, fc1, fc2 + 2 attention)


def exporter_projection(graph: Any) -> Any:
    producers = {out: node for node in graph.node for out in node.output}
    node = producers[graph.output[0].name]
    while node.op_type != "MatMul":
        node = producers[node.input[0]]
    return node


# --- refusal ------------------------------------------------------------------------------


def test_a_missed_invariance_bar_exits_non_zero_naming_the_shortfall(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from clipsearch.cli import main

    monkeypatch.setattr(exporter, "BATCH_INVARIANCE_MIN_COSINE", 1.01)
    monkeypatch.setitem(PARITY_BARS, "int8-static", 1.02)
    out = tmp_path / "bundle"
    code = main(["export", str(checkpoint), "--out", str(out), "--precision", "fp32,int8-static"])
    assert code == 1
    err = capsys.readouterr().err
    for tower in ("text", "vision"):
        assert (
            f"int8-static {tower} tower: an item alone vs in a batch of 32: min cosine 1.0000000 "
            "is 1.00e-02 below the bar 1.01"
        ) in err
        assert f"int8-static {tower} tower: min cosine 0.99" in err
        assert "below the bar 1.02" in err
    assert "fp32 text tower" not in err
    assert not (out / "manifest.json").exists()
    assert (out / "text.int8-static.onnx").exists()  # left for inspection


def test_an_unreadable_calibration_set_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(exporter.ExportError, match="0 images and 0 texts"):
        exporter.export_bundle(
            checkpoint,
            tmp_path / "bundle",
            precisions=("fp32", "int8-static"),
            calibration=empty,
            progress=quiet,
        )


# --- a user's calibration set -------------------------------------------------------------


def test_calibration_sets_from_a_directory_and_from_manifests(tmp_path: Path) -> None:
    generate_gallery(tmp_path, 5, seed=3, size=48)
    (tmp_path / "captions.txt").write_text("a red star\n\n  一只猫  \nsunset\n", encoding="utf-8")
    from_dir = calibration.load_calibration(tmp_path)
    assert len(from_dir.images) == 5
    assert from_dir.texts == ("a red star", "一只猫", "sunset")
    from_jsonl = calibration.load_calibration(tmp_path / "manifest.jsonl")
    from_csv = calibration.load_calibration(tmp_path / "manifest.csv")
    assert from_jsonl.images == from_csv.images == from_dir.images
    assert len(from_jsonl.texts) == 10 and from_jsonl.texts == from_csv.texts  # en + zh each
    assert sum("的" in text for text in from_jsonl.texts) == 5  # the Chinese captions
    with pytest.raises(ValueError, match=r"must be \.jsonl or \.csv"):
        calibration.load_calibration(tmp_path / "captions.txt")
    builtin = calibration.builtin_calibration_set()
    assert builtin == calibration.builtin_calibration_set()  # deterministic, byte for byte
    assert (len(builtin.images), len(builtin.texts)) == (64, 114)


def test_export_calibrates_on_a_user_directory(
    checkpoint: Path, bundle: Bundle, tmp_path: Path, capsys: Any
) -> None:
    from clipsearch.cli import main

    user = tmp_path / "mine"
    generate_gallery(user, 12, seed=4, size=64)
    (user / "texts.txt").write_text(
        "\n".join(["a photo of a dog", "红色的圆形", "two cups of tea on a table"] * 3),
        encoding="utf-8",
    )
    out = tmp_path / "bundle"
    args = ["export", str(checkpoint), "--out", str(out), "--precision", "fp32,int8-static"]
    assert main([*args, "--calibration", str(user)]) == 0
    assert "int8-static: text min cosine" in capsys.readouterr().out
    variant = load_bundle(out).manifest.variants["int8-static"]
    assert variant.quantization["calibration"] == f"{user}: 12 images, 9 texts"
    assert variant.is_batch_invariant()
    # The scales came from this set: they differ from the built-in calibration's.
    mine, builtin = (
        scales(out / "vision.int8-static.onnx"),
        scales(bundle.path(variant.vision_file)),
    )
    assert mine.keys() == builtin.keys() and len(mine) > 10
    assert any(abs(mine[k] - builtin[k]) > 1e-6 for k in mine)


def scales(file: Path) -> dict[str, float]:
    from onnx import numpy_helper

    graph = onnx.load(str(file)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {
        node.input[1]: float(values[node.input[1]])
        for node in graph.node
        if node.op_type == "QuantizeLinear" and values[node.input[1]].ndim == 0
    }


# --- serving ------------------------------------------------------------------------------


def test_auto_picks_int8_static_only_where_it_passed_the_gate() -> None:
    both = ["fp32", "int8", "int8-static"]
    assert choose_precision("auto", ("cpu",), both, ["fp32", "int8-static"]) == "int8-static"
    assert choose_precision("auto", ("cpu",), both, ["fp32"]) == "fp32"
    assert choose_precision("auto", ("cpu",), ["fp32", "int8"], ["fp32"]) == "fp32"
    assert choose_precision("auto", ("cuda", "cpu"), [*both, "fp16"], both) == "fp16"
    assert choose_precision("fp32", ("cpu",), both, both) == "fp32"
    assert choose_precision("int8", ("cpu",), both, both) == "int8"


def served_precision(tmp_path: Path, model: Path, precision: str) -> tuple[str, str]:
    settings = quick_settings(tmp_path / f"{precision}.db", model=model, precision=precision)
    with ThreadedServer(settings) as server, grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.ClipSearchStub(channel).Info(pb.InfoRequest(), timeout=10)
    return info.text.precision, info.vision.precision


def test_the_server_serves_int8_static_by_default_on_cpu_and_fp32_on_request(
    bundle: Bundle, tmp_path: Path
) -> None:
    assert served_precision(tmp_path, bundle.root, "auto") == ("int8-static", "int8-static")
    assert served_precision(tmp_path, bundle.root, "fp32") == ("fp32", "fp32")


def test_without_recorded_invariance_auto_stays_fp32(bundle: Bundle, tmp_path: Path) -> None:
    # A bundle whose int8-static carries no passing batch-invariance figures (hand-made, or
    # from an exporter that did not measure them) is never picked by itself.
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.root, copy)
    raw = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    raw["variants"]["int8-static"]["batch_invariance"]["text_min_cosine"] = 0.9995
    (copy / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    variant = load_bundle(copy).manifest.variants["int8-static"]
    assert not variant.is_batch_invariant()
    assert not dataclasses.replace(variant, batch_invariance={}).is_batch_invariant()
    assert served_precision(tmp_path, copy, "auto") == ("fp32", "fp32")
    assert served_precision(tmp_path, copy, "int8-static") == ("int8-static", "int8-static")
