"""The ONNX encoder and the encoding pipeline on a real bundle (the committed demo model, or
CLIPSEARCH_TEST_MODEL): batch == single, normalization, providers, precision, timings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from image_fixtures import encode, pattern
from server_fixtures import served_model

from clipsearch.server.batcher import Priority
from clipsearch.server.bundle import Bundle, load_bundle
from clipsearch.server.encoder import (
    EncoderOptions,
    OnnxEncoder,
    choose_precision,
    resolve_providers,
)
from clipsearch.server.errors import (
    BundleError,
    ConfigurationError,
    ProviderUnavailable,
    UndecodableImage,
)
from clipsearch.server.pipeline import EncodingPipeline

MODEL = served_model()
INT8_BATCH_COSINE = 0.995
TEXTS = [
    "a red circle",
    "红色的圆形",
    "",
    "a blue square and a yellow star on a dark background, seen from far away",
    "🙂 emoji, punctuation?!",
    " ".join(["word"] * 120),
    "star",
]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(MODEL)


@pytest.fixture(scope="module", params=sorted(load_bundle(MODEL).manifest.variants))
def encoder(request: pytest.FixtureRequest, bundle: Bundle) -> OnnxEncoder:
    return OnnxEncoder(bundle, EncoderOptions(precision=request.param, warmup=False))


def images(encoder: OnnxEncoder, n: int) -> list[np.ndarray]:
    sizes = [(31, 17), (200, 120), (64, 64), (90, 300), (7, 7), (128, 96), (50, 51)]
    return [
        encoder.preprocessor(encode(pattern(sizes[i % len(sizes)], seed=i), "PNG"))
        for i in range(n)
    ]


def assert_batch_equals_single(
    encoder: OnnxEncoder, batch: np.ndarray, singles: np.ndarray
) -> None:
    if encoder.precision == "int8":
        # Dynamic quantization scales activations per batch: close, not equal (this is why
        # int8 is opt-in). fp32 rows must be equal.
        assert np.min(np.sum(batch * singles, axis=1)) >= INT8_BATCH_COSINE
    else:
        np.testing.assert_allclose(singles, batch, atol=1e-5)


def test_text_batch_equals_single_and_is_normalized(encoder: OnnxEncoder) -> None:
    batch = encoder.encode_text(TEXTS)
    assert batch.shape == (len(TEXTS), encoder.dim) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([encoder.encode_text([text]) for text in TEXTS])
    assert_batch_equals_single(encoder, batch, singles)


def test_image_batch_equals_single_and_is_normalized(encoder: OnnxEncoder) -> None:
    pixels = images(encoder, 7)
    batch = encoder.encode_images(pixels)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([encoder.encode_images([one]) for one in pixels])
    assert_batch_equals_single(encoder, batch, singles)


def test_text_batches_are_padded_to_the_longest_item_only(encoder: OnnxEncoder) -> None:
    tokens = encoder.tokenizer.tokenize(["a red circle", "star"])
    feeds = encoder.tokenizer.pad(tokens)
    assert feeds["input_ids"].shape == (2, max(len(t.ids) for t in tokens))
    assert feeds["input_ids"].shape[1] < encoder.manifest.text.context_length


def test_empty_inputs_give_empty_arrays(encoder: OnnxEncoder) -> None:
    assert encoder.encode_text([]).shape == (0, encoder.dim)
    assert encoder.encode_images([]).shape == (0, encoder.dim)


def test_auto_precision_is_deterministic_fp32_on_cpu_and_fp16_on_gpu() -> None:
    assert choose_precision("auto", ("cpu",), ["fp32", "int8", "fp16"]) == "fp32"
    assert choose_precision("int8", ("cpu",), ["fp32", "int8"]) == "int8"
    assert choose_precision("auto", ("cuda", "cpu"), ["fp32", "fp16"]) == "fp16"
    assert choose_precision("auto", ("cuda",), ["fp32", "int8"]) == "fp32"
    with pytest.raises(ConfigurationError, match="fp16 variant is for GPUs"):
        choose_precision("fp16", ("cpu",), ["fp32", "fp16"])
    with pytest.raises(BundleError, match="has only"):
        choose_precision("fp16", ("cuda",), ["fp32"])


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def test_providers_resolve_in_order_and_a_missing_gpu_one_is_refused_unless_fallback() -> None:
    with_cuda = [CUDA, CPU]
    assert resolve_providers(("cuda",), with_cuda, allow_cpu_fallback=False) == [CUDA, CPU]
    assert resolve_providers(("cpu",), with_cuda, allow_cpu_fallback=False) == [CPU]
    assert resolve_providers(("tensorrt", "cuda"), with_cuda, allow_cpu_fallback=True) == [
        CUDA,
        CPU,
    ]
    with pytest.raises(ProviderUnavailable, match=r"'tensorrt'.*available: CUDA.*Install"):
        resolve_providers(("tensorrt", "cuda", "cpu"), with_cuda, allow_cpu_fallback=False)
    assert resolve_providers(("cuda", "cpu"), [CPU], allow_cpu_fallback=True) == [CPU]


# Runs where the suite runs: the CUDA branch on a machine whose onnxruntime has the CUDA
# provider (onnxruntime-gpu), the refusal branch everywhere else. Both branches assert.
@pytest.mark.filterwarnings("ignore:Specified provider")
def test_asking_for_cuda_runs_on_cuda_where_it_exists_and_is_refused_where_not(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = EncoderOptions(providers=("cuda",), precision="fp32", warmup=False)
    cpu = OnnxEncoder(bundle, EncoderOptions(precision="fp32", warmup=False))
    if CUDA in ort.get_available_providers():
        gpu = OnnxEncoder(bundle, cuda)
        assert gpu.text_providers[0] == CUDA and gpu.vision_providers[0] == CUDA
        # Same fp32 graphs; the CUDA kernels (TF32 matmuls by default) round differently,
        # so the bar is the GPU parity bar, not equality.
        cosines = np.sum(gpu.encode_text(TEXTS) * cpu.encode_text(TEXTS), axis=1)
        assert cosines.min() >= 0.999, cosines
        pixels = images(cpu, 7)
        cosines = np.sum(gpu.encode_images(pixels) * cpu.encode_images(pixels), axis=1)
        assert cosines.min() >= 0.999, cosines
        return
    with pytest.raises(ProviderUnavailable, match=r"'cuda'.*--allow-cpu-fallback"):
        OnnxEncoder(bundle, cuda)
    fallback = OnnxEncoder(
        bundle, replace(cuda, providers=("cuda", "cpu"), allow_cpu_fallback=True)
    )
    assert fallback.text_providers == [CPU] and fallback.vision_providers == [CPU]
    np.testing.assert_allclose(fallback.encode_text(TEXTS), cpu.encode_text(TEXTS), atol=1e-6)
    # A provider this onnxruntime lists but cannot start (onnxruntime-gpu without the CUDA
    # libraries) makes ORT fall back to CPU with only a log line: the encoder refuses that.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ProviderUnavailable, match=r"runs on CPUExecutionProvider"):
        OnnxEncoder(bundle, cuda)
    fallback = OnnxEncoder(bundle, replace(cuda, allow_cpu_fallback=True))
    assert fallback.text_providers == [CPU]


def test_warmup_runs_both_towers_at_each_batch_size(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []
    real_text, real_vision = OnnxEncoder.run_text, OnnxEncoder.run_vision

    def spy_text(self: OnnxEncoder, feeds: dict[str, np.ndarray]) -> np.ndarray:
        seen.append(("text", len(feeds["input_ids"])))
        return real_text(self, feeds)

    def spy_vision(self: OnnxEncoder, pixels: np.ndarray) -> np.ndarray:
        seen.append(("vision", len(pixels)))
        return real_vision(self, pixels)

    monkeypatch.setattr(OnnxEncoder, "run_text", spy_text)
    monkeypatch.setattr(OnnxEncoder, "run_vision", spy_vision)
    OnnxEncoder(bundle, EncoderOptions(warmup_batch_sizes=(1, 4)))
    assert sorted(seen) == [("text", 1), ("text", 4), ("vision", 1), ("vision", 4)]


async def test_pipeline_gives_the_encoders_vectors_with_timings(bundle: Bundle) -> None:
    encoder = OnnxEncoder(bundle, EncoderOptions(precision="fp32", warmup=False))
    pipeline = EncodingPipeline(
        encoder, encoder.tokenizer, encoder.preprocessor, max_batch_size=4, max_wait_ms=1
    )
    await pipeline.start()
    try:
        jpegs = [encode(pattern((120, 80 + 10 * i), seed=i), "JPEG", quality=92) for i in range(6)]
        got = await pipeline.encode_images(jpegs)
        expected = encoder.encode_images([encoder.preprocessor(j) for j in jpegs])
        np.testing.assert_allclose(got.vectors, expected, atol=1e-5)
        assert got.timing.preprocess_us > 0 and got.timing.inference_us > 0
        assert 1 <= got.timing.batch_size <= 4
        texts = await pipeline.encode_texts(TEXTS, Priority.BULK)
        np.testing.assert_allclose(texts.vectors, encoder.encode_text(TEXTS), atol=1e-5)
        assert texts.truncated == tuple(len(t) > 100 for t in TEXTS)
        with pytest.raises(UndecodableImage, match=r"^image 1: "):
            await pipeline.encode_images([jpegs[0], b"\x00\x01 not an image", jpegs[1]])
    finally:
        await pipeline.close()


@pytest.mark.parametrize("size", [128, 512])
def test_fast_jpeg_path_stays_within_cosine_0995_of_the_exact_path(
    bundle: Bundle, tmp_path: Path, size: int
) -> None:
    from clipsearch.export.demo_data import generate_gallery

    items = generate_gallery(tmp_path, 40, seed=3, size=size)
    exact = OnnxEncoder(bundle, EncoderOptions(precision="fp32", fast_jpeg=False, warmup=False))
    fast = OnnxEncoder(bundle, EncoderOptions(precision="fp32", fast_jpeg=True, warmup=False))
    data = [(tmp_path / item.path).read_bytes() for item in items]
    cosines = np.sum(
        exact.encode_images([exact.preprocessor(d) for d in data])
        * fast.encode_images([fast.preprocessor(d) for d in data]),
        axis=1,
    )
    assert cosines.min() >= 0.995, f"min cosine {cosines.min():.5f}"
