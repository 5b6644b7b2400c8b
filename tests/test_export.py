"""`clipsearch export` on a tiny random CLIP made in the test: bundle, graphs, parity, failures."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import export_fixtures
import numpy as np
import pytest
from image_fixtures import encode, pattern
from PIL import Image

from clipsearch.server.bundle import PARITY_BARS, Bundle, load_bundle

torch = pytest.importorskip("torch", reason="export needs the [export] extra")
transformers = pytest.importorskip("transformers", reason="export needs the [export] extra")
onnx = pytest.importorskip("onnx", reason="export needs the [export] extra")

from clipsearch.export.exporter import ExportError, ParityFailure, export_bundle  # noqa: E402
from clipsearch.export.parity import PARITY_TEXTS, OnnxTowers, parity_images  # noqa: E402
from clipsearch.export.tokenizers import BOS_ID, EOS_ID  # noqa: E402

FRESH_TEXTS = [
    "a green triangle",
    "蓝色的正方形",
    "",
    "an extremely long description " * 20,
    "🙂 smile",
    "The Quick Brown Fox!",
    "x",
]


def quiet(message: str) -> None:
    del message


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_fixtures.tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(export_fixtures.tiny_bundle(tmp_path_factory))


@pytest.fixture(scope="session")
def torch_side(checkpoint: Path) -> tuple[Any, Any, Any]:
    model = transformers.CLIPModel.from_pretrained(checkpoint)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(checkpoint)
    return model, tokenizer, processor


def fresh_images() -> list[bytes]:
    return [
        encode(pattern((64, 40), "RGB", 21), "PNG"),
        encode(pattern((33, 90), "L", 22), "PNG"),
        encode(pattern((50, 50), "RGBA", 23), "PNG"),
        encode(pattern((7, 4), "RGB", 24), "PNG"),
        encode(pattern((640, 480), "RGB", 25), "BMP"),
        encode(pattern((100, 60), "P+transparency", 26), "GIF"),
        encode(pattern((45, 80), "CMYK", 27), "TIFF"),
    ]


def towers(bundle: Bundle, precision: str) -> OnnxTowers:
    variant = bundle.variant(precision)
    manifest = bundle.manifest
    return OnnxTowers.load(
        bundle.path(variant.text_file),
        bundle.path(variant.vision_file),
        bundle.tokenizer_path,
        manifest.text,
        manifest.vision,
    )


def normalized(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def torch_embeddings(torch_side: tuple[Any, Any, Any]) -> tuple[np.ndarray, np.ndarray]:
    model, tokenizer, processor = torch_side
    tokens = tokenizer(
        FRESH_TEXTS, padding="longest", truncation=True, max_length=77, return_tensors="pt"
    )
    pixels = processor(
        [Image.open(io.BytesIO(data)) for data in fresh_images()], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        text = model.get_text_features(**tokens).pooler_output.numpy()
        image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    return text, image


# --- the bundle ---------------------------------------------------------------------------


def test_manifest_describes_the_model(bundle: Bundle) -> None:
    manifest = bundle.manifest
    assert manifest.family == "clip"
    assert manifest.name == "tiny-clip"
    assert manifest.source == "tiny-clip"
    assert manifest.dim == 16
    assert manifest.opset == 17
    assert manifest.text.context_length == 77
    assert (manifest.text.bos_id, manifest.text.eos_id, manifest.text.pad_id) == (
        BOS_ID,
        EOS_ID,
        EOS_ID,
    )
    assert manifest.text.inputs == ("input_ids",)
    assert manifest.vision.image_size == 32
    assert manifest.vision.resize_shortest_edge == 32
    assert manifest.vision.resample == "bicubic"
    assert manifest.vision.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert manifest.vision.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert sorted(manifest.variants) == ["fp16", "fp32", "int8", "int8-static"]
    assert manifest.variants["int8"].text_file == "text.int8.onnx"
    assert manifest.variants["fp32"].vision_file == "vision.onnx"
    name, digest = manifest.model_id.rsplit("-", 1)
    assert name == "tiny-clip"
    assert len(digest) == 16
    int(digest, 16)
    for package in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers"):
        assert manifest.created_with[package]
    assert "CPUExecutionProvider" in manifest.created_with["fp16_parity"]
    raw = json.loads(bundle.path("manifest.json").read_text(encoding="utf-8"))
    assert raw["format_version"] == 1


def test_parity_figures_in_the_manifest_meet_the_bars(bundle: Bundle) -> None:
    for precision, variant in bundle.manifest.variants.items():
        for parity in (variant.text_parity, variant.vision_parity):
            assert parity.min_cosine >= PARITY_BARS[precision], precision
            assert parity.mean_cosine >= parity.min_cosine
        assert variant.text_parity.n_inputs == len(PARITY_TEXTS)
        assert variant.vision_parity.n_inputs == len(parity_images())
    fp32 = bundle.manifest.variants["fp32"]
    assert fp32.text_parity.max_abs_diff < 1e-5
    assert fp32.vision_parity.max_abs_diff < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16", "int8-static"])
def test_graph_inputs_outputs_and_dynamic_axes(bundle: Bundle, precision: str) -> None:
    variant = bundle.variant(precision)
    float32, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    expected = {
        variant.text_file: ("input_ids", int64, ["batch", "sequence"], "text_embeds"),
        variant.vision_file: ("pixel_values", float32, ["batch", 3, 32, 32], "image_embeds"),
    }
    for file, (input_name, input_type, input_dims, output_name) in expected.items():
        model = onnx.load(str(bundle.path(file)), load_external_data=False)
        (graph_input,) = model.graph.input
        (graph_output,) = model.graph.output
        assert graph_input.name == input_name
        assert graph_input.type.tensor_type.elem_type == input_type
        dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        assert dims == input_dims
        assert graph_output.name == output_name
        assert graph_output.type.tensor_type.elem_type == float32
        out_dims = [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim]
        assert out_dims == ["batch", 16]
        assert {o.domain: o.version for o in model.opset_import}[""] == 17


def test_variants_hold_what_their_names_say(bundle: Bundle) -> None:
    int8 = onnx.load(str(bundle.path("text.int8.onnx")))
    ops = {node.op_type for node in int8.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    int8_weights = [
        i
        for i in int8.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
    ]
    assert len(int8_weights) == 13  # 6 per layer x 2 layers + the text projection
    fp16 = onnx.load(str(bundle.path("vision.fp16.onnx")))
    types = {i.data_type for i in fp16.graph.initializer if len(i.dims) == 2}
    assert types == {onnx.TensorProto.FLOAT16}


# --- parity, batching, padding ------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16", "int8-static"])
def test_parity_on_fresh_inputs_per_tower(
    bundle: Bundle, torch_side: tuple[Any, Any, Any], precision: str
) -> None:
    text_ref, image_ref = torch_embeddings(torch_side)
    onnx_towers = towers(bundle, precision)
    text = onnx_towers.encode_texts(FRESH_TEXTS)
    image = onnx_towers.encode_images(fresh_images())
    bar = PARITY_BARS[precision]
    assert np.sum(normalized(text) * normalized(text_ref), axis=1).min() >= bar
    assert np.sum(normalized(image) * normalized(image_ref), axis=1).min() >= bar
    if precision == "fp32":
        # Unnormalized projections, as PyTorch returns them (the server normalizes).
        np.testing.assert_allclose(text, text_ref, atol=1e-5)
        np.testing.assert_allclose(image, image_ref, atol=1e-5)
        assert not np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-3)


def test_batch_of_one_equals_its_row_in_a_batch_of_seven(bundle: Bundle) -> None:
    fp32 = towers(bundle, "fp32")
    texts, images = FRESH_TEXTS, fresh_images()
    assert len(texts) == len(images) == 7
    batch_text = fp32.encode_texts(texts)
    batch_image = fp32.encode_images(images)
    for i in range(7):
        np.testing.assert_allclose(fp32.encode_texts([texts[i]])[0], batch_text[i], atol=1e-5)
        np.testing.assert_allclose(fp32.encode_images([images[i]])[0], batch_image[i], atol=1e-5)


def test_int8_rows_depend_slightly_on_their_batch(bundle: Bundle) -> None:
    # Dynamic quantization shares one activation scale per batch: not bit-equal, but close.
    int8 = towers(bundle, "int8")
    batch = normalized(int8.encode_texts(FRESH_TEXTS))
    singles = normalized(np.concatenate([int8.encode_texts([t]) for t in FRESH_TEXTS]))
    cosines = np.sum(batch * singles, axis=1)
    assert cosines.min() >= PARITY_BARS["int8"]


def test_padding_after_eos_does_not_change_the_text_embedding(bundle: Bundle) -> None:
    fp32 = towers(bundle, "fp32")
    items = fp32.tokenizer.tokenize(["a photo of a cat", "dog"])
    feeds = fp32.tokenizer.pad(items)
    padded = np.concatenate([feeds["input_ids"], np.full((2, 30), EOS_ID)], axis=1)
    base = fp32.text_session.run(None, feeds)[0]
    longer = fp32.text_session.run(None, {"input_ids": padded})[0]
    np.testing.assert_allclose(longer, base, atol=1e-6)


# --- failures -----------------------------------------------------------------------------


def test_a_missed_bar_exits_non_zero_naming_tower_precision_and_shortfall(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from clipsearch.cli import main

    monkeypatch.setitem(PARITY_BARS, "fp32", 1.01)
    out = tmp_path / "bundle"
    code = main(["export", str(checkpoint), "--out", str(out), "--precision", "fp32"])
    assert code == 1
    err = capsys.readouterr().err
    assert "fp32 text tower: min cosine 1.000000 is 0.010000 below the bar 1.01" in err
    assert "fp32 vision tower: min cosine 1.000000 is 0.010000 below the bar 1.01" in err
    assert not (out / "manifest.json").exists()
    assert (out / "text.onnx").exists()  # left for inspection


def test_a_corrupted_weight_is_caught_by_parity(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnx import numpy_helper

    from clipsearch.export import towers as towers_module

    real_export = towers_module.export_vision_tower

    def export_then_corrupt(model: Any, path: Path, opset: int, image_size: int) -> Path:
        real_export(model, path, opset, image_size)
        graph = onnx.load(str(path))
        weights = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        values = numpy_helper.to_array(weights).copy()
        values += np.random.default_rng(0).normal(0, values.std(), values.shape)
        weights.CopyFrom(numpy_helper.from_array(values.astype(np.float32), weights.name))
        onnx.save(graph, str(path))
        return path

    monkeypatch.setattr(towers_module, "export_vision_tower", export_then_corrupt)
    with pytest.raises(ParityFailure) as failure:
        export_bundle(checkpoint, tmp_path / "bundle", precisions=("fp32",), progress=quiet)
    assert len(failure.value.misses) == 1
    assert failure.value.misses[0].startswith("fp32 vision tower: min cosine")
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def copy_with_text_config(checkpoint: Path, copy: Path, **text_changes: int) -> Path:
    shutil.copytree(checkpoint, copy)
    config_file = copy / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["text_config"].update(text_changes)
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return copy


def test_eos_id_mismatch_between_config_and_tokenizer_is_refused(
    checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = copy_with_text_config(checkpoint, tmp_path / "ckpt", eos_token_id=1)
    with pytest.raises(ExportError, match=r"text_config\.eos_token_id is 1 but the tokenizer"):
        export_bundle(checkpoint, tmp_path / "bundle", precisions=("fp32",), progress=quiet)


def test_legacy_eos_token_id_2_pools_at_the_largest_id(checkpoint: Path, tmp_path: Path) -> None:
    # OpenAI's own checkpoints say eos_token_id=2; transformers then pools at argmax(ids).
    checkpoint = copy_with_text_config(
        checkpoint, tmp_path / "ckpt", eos_token_id=2, bos_token_id=0, pad_token_id=1
    )
    manifest = export_bundle(checkpoint, tmp_path / "bundle", precisions=("fp32",), progress=quiet)
    assert manifest.variants["fp32"].text_parity.min_cosine >= PARITY_BARS["fp32"]
    assert manifest.text.eos_id == EOS_ID


def test_unknown_precision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown precision"):
        export_bundle("unused", tmp_path / "bundle", precisions=("fp32", "bf16"), progress=quiet)
