"""Model families, offline: tiny random checkpoints of each architecture exported and checked.

Per family: the export passes its parity gate (through the server's tokenizer and image
preprocessing); the server's text feeds equal the family's own tokenizer on English, Chinese,
mixed and long texts; its image tensors equal the family's own image processor on the image
matrix of CLIP's preprocessing tests; the served vectors equal PyTorch's on fresh inputs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import family_fixtures
import numpy as np
import pytest
from image_fixtures import encode, pattern
from PIL import Image

from clipsearch.server.bundle import PARITY_BARS, Bundle, load_bundle
from clipsearch.server.encoder import EncoderOptions, OnnxEncoder
from clipsearch.server.errors import InvalidInput
from clipsearch.server.images import ImagePreprocessor
from clipsearch.server.text import TextTokenizer
from tests.test_image_preprocessing import CASES

torch = pytest.importorskip("torch", reason="export needs the [export] extra")
transformers = pytest.importorskip("transformers", reason="export needs the [export] extra")

TEXTS = [
    "a photo of a cat",
    "The Quick Brown Fox!",
    "红色的圆形",
    "一只黑色的狗在绿色的草地上奔跑",
    "Hello 世界, mixed 文字 and English 123",
    "",
    "a red star " * 40,  # past every context length here
    "红色" * 80,
]


def family_images() -> list[Image.Image]:
    return [pattern(size, mode, seed) for seed, (mode, size) in enumerate(CASES)]


def assert_feeds_equal(bundle: Bundle, reference: dict[str, Any], texts: Sequence[str]) -> None:
    tokenizer = TextTokenizer.from_bundle(bundle)
    ours = tokenizer.pad(tokenizer.tokenize(texts))
    assert list(ours) == list(bundle.manifest.text.inputs)
    for name, mine in ours.items():
        np.testing.assert_array_equal(mine, reference[name].numpy(), err_msg=name)


def assert_pixels_equal(bundle: Bundle, processor: Any, atol: float = 1e-6) -> None:
    ours = ImagePreprocessor.from_bundle(bundle, fast_jpeg=False)
    worst = 0.0
    for image in family_images():
        theirs = processor(image, return_tensors="np")["pixel_values"][0]
        mine = ours.from_image(image)
        assert mine.shape == theirs.shape
        worst = max(worst, float(np.abs(mine - theirs).max()))
    assert worst <= atol


def assert_parity_recorded(bundle: Bundle) -> None:
    for precision, variant in bundle.manifest.variants.items():
        assert variant.text_parity.min_cosine >= PARITY_BARS[precision]
        assert variant.vision_parity.min_cosine >= PARITY_BARS[precision]
        assert variant.text_parity.n_inputs == 12 and variant.vision_parity.n_inputs == 9


def served(bundle: Bundle) -> OnnxEncoder:
    return OnnxEncoder(bundle, EncoderOptions(warmup=False))


def fresh_images() -> list[bytes]:
    return [
        encode(pattern((64, 40), "RGB", 31), "PNG"),
        encode(pattern((33, 90), "L", 32), "PNG"),
        encode(pattern((50, 50), "RGB", 33), "PNG"),
    ]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    out: np.ndarray = np.sum(a * b, axis=1)
    return out


# --- Chinese-CLIP ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chinese_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Bundle]:
    checkpoint = family_fixtures.chinese_clip_checkpoint(tmp_path_factory)
    bundle = family_fixtures.exported(tmp_path_factory, "chinese-clip", checkpoint)
    return checkpoint, load_bundle(bundle)


def test_chinese_clip_manifest_lists_bert_inputs_and_the_squash_rule(
    chinese_clip: tuple[Path, Bundle],
) -> None:
    _, bundle = chinese_clip
    manifest = bundle.manifest
    assert manifest.family == "chinese-clip"
    assert manifest.text.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert (manifest.text.bos_id, manifest.text.eos_id, manifest.text.pad_id) == (2, 3, 0)
    assert manifest.text.context_length == 52
    assert (manifest.vision.resize, manifest.vision.crop) == ("squash", "none")
    assert manifest.dim == family_fixtures.PROJECTION
    assert_parity_recorded(bundle)


def test_chinese_clip_tokenization_equals_bert_tokenizer(chinese_clip: tuple[Path, Bundle]) -> None:
    checkpoint, bundle = chinese_clip
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    reference = hf(TEXTS, padding="longest", truncation=True, max_length=52, return_tensors="pt")
    assert_feeds_equal(bundle, reference, TEXTS)
    flags = [t.truncated for t in TextTokenizer.from_bundle(bundle).tokenize(TEXTS)]
    assert flags == [False] * 6 + [True, True]


def test_chinese_clip_pixels_equal_its_image_processor(chinese_clip: tuple[Path, Bundle]) -> None:
    checkpoint, bundle = chinese_clip
    assert_pixels_equal(
        bundle, transformers.ChineseCLIPImageProcessorPil.from_pretrained(checkpoint)
    )


def test_chinese_clip_served_vectors_equal_pytorch(chinese_clip: tuple[Path, Bundle]) -> None:
    checkpoint, bundle = chinese_clip
    model = transformers.ChineseCLIPModel.from_pretrained(checkpoint).eval()
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    processor = transformers.ChineseCLIPImageProcessorPil.from_pretrained(checkpoint)
    texts = ["一个蓝色的三角形", "a green square", "蓝色 blue 方块"]
    with torch.no_grad():
        tokens = hf(texts, padding=True, return_tensors="pt")
        # what forward() computes: text_projection(last_hidden_state[:, 0])
        state = model.text_model(**tokens).last_hidden_state
        text = model.text_projection(state[:, 0]).numpy()
        pixels = processor([Image.open(io.BytesIO(b)) for b in fresh_images()], return_tensors="pt")
        image = model.get_image_features(**pixels).pooler_output.numpy()
    encoder = served(bundle)
    assert cosines(encoder.encode_text(texts), text).min() >= 0.9999
    pre = [encoder.preprocessor(b) for b in fresh_images()]
    assert cosines(encoder.encode_images(pre), image).min() >= 0.9999


# --- long texts -----------------------------------------------------------------------------


def test_strict_text_length_refuses_instead_of_truncating(
    chinese_clip: tuple[Path, Bundle],
) -> None:
    _, bundle = chinese_clip
    strict = TextTokenizer.from_bundle(bundle, strict=True)
    assert [len(t.ids) for t in strict.tokenize(["红色的圆形"])] == [7]
    with pytest.raises(
        InvalidInput, match=r"text 1 is 122 tokens long, over the model's context of 52"
    ):
        strict.tokenize(["ok", "a red star " * 40])
    exactly = "红" * 50  # 50 + [CLS] + [SEP] = the context: kept whole
    assert not strict.tokenize([exactly])[0].truncated


# --- SigLIP ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Bundle]:
    checkpoint = family_fixtures.siglip_checkpoint(tmp_path_factory)
    bundle = family_fixtures.exported(tmp_path_factory, "siglip", checkpoint)
    return checkpoint, load_bundle(bundle)


def test_siglip_manifest_fixed_length_text_and_square_resize(siglip: tuple[Path, Bundle]) -> None:
    _, bundle = siglip
    manifest = bundle.manifest
    assert manifest.family == "siglip"
    assert manifest.text.inputs == ("input_ids",)
    assert (manifest.text.bos_id, manifest.text.padding, manifest.text.context_length) == (
        None,
        "max_length",
        64,
    )
    assert (manifest.vision.resize, manifest.vision.crop, manifest.vision.resample) == (
        "squash",
        "none",
        "bilinear",
    )
    assert manifest.vision.mean == (0.5, 0.5, 0.5) and manifest.vision.std == (0.5, 0.5, 0.5)
    assert_parity_recorded(bundle)


SIGLIP_EXTRA = [
    "  leading and trailing  ",
    "multiple   spaces\there",
    "UPPER lower MiXeD, with: punctuation!?",
    "emoji 🐱🚀 & more",
    "   \t\n  ",
]


def test_siglip_tokenization_equals_siglip_tokenizer(siglip: tuple[Path, Bundle]) -> None:
    checkpoint, bundle = siglip
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert type(hf).__name__ == "SiglipTokenizer"
    texts = TEXTS + SIGLIP_EXTRA
    reference = hf(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    assert_feeds_equal(bundle, reference, texts)
    feeds = TextTokenizer.from_bundle(bundle).pad(TextTokenizer.from_bundle(bundle).tokenize(["a"]))
    assert feeds["input_ids"].shape == (1, 64)  # fixed length even for one short text


def test_siglip_pixels_equal_its_image_processor(siglip: tuple[Path, Bundle]) -> None:
    checkpoint, bundle = siglip
    assert_pixels_equal(bundle, transformers.SiglipImageProcessorPil.from_pretrained(checkpoint))


def test_siglip_served_vectors_equal_pytorch(siglip: tuple[Path, Bundle]) -> None:
    checkpoint, bundle = siglip
    model = transformers.SiglipModel.from_pretrained(checkpoint).eval()
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    processor = transformers.SiglipImageProcessorPil.from_pretrained(checkpoint)
    texts = ["a blue triangle", "蓝色的正方形", "mixed 文字"]
    with torch.no_grad():
        tokens = hf(texts, padding="max_length", max_length=64, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output.numpy()
        pixels = processor([Image.open(io.BytesIO(b)) for b in fresh_images()], return_tensors="pt")
        image = model.get_image_features(**pixels).pooler_output.numpy()
    encoder = served(bundle)
    assert cosines(encoder.encode_text(texts), text).min() >= 0.9999
    pre = [encoder.preprocessor(b) for b in fresh_images()]
    assert cosines(encoder.encode_images(pre), image).min() >= 0.9999


# --- multilingual text tower + CLIP vision tower --------------------------------------------


@pytest.fixture(scope="session")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Bundle]:
    import export_fixtures

    text = family_fixtures.multilingual_text_checkpoint(tmp_path_factory)
    vision = export_fixtures.tiny_checkpoint(tmp_path_factory)
    bundle = family_fixtures.exported(tmp_path_factory, "multilingual", text, vision=vision)
    return text, vision, load_bundle(bundle)


def test_multilingual_manifest_records_both_sources(
    multilingual: tuple[Path, Path, Bundle],
) -> None:
    text, vision, bundle = multilingual
    manifest = bundle.manifest
    assert manifest.family == "multilingual-clip"
    assert manifest.sources == {"text": str(text), "vision": str(vision)}
    assert manifest.source == f"text: {text}; vision: {vision}"
    assert manifest.text.inputs == ("input_ids", "attention_mask")  # DistilBERT: no types
    assert (manifest.vision.resize, manifest.vision.crop) == ("shortest_edge", "center")
    assert manifest.text.context_length == 128
    assert_parity_recorded(bundle)


def test_multilingual_tokenization_equals_distilbert_tokenizer(
    multilingual: tuple[Path, Path, Bundle],
) -> None:
    text, _, bundle = multilingual
    hf = transformers.AutoTokenizer.from_pretrained(text)
    texts = [*TEXTS, "Quick BROWN fox"]  # cased vocabulary: "Quick" is not "quick"
    reference = hf(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert_feeds_equal(bundle, {k: reference[k] for k in ("input_ids", "attention_mask")}, texts)


def test_multilingual_served_vectors_are_mean_pooled_and_projected(
    multilingual: tuple[Path, Path, Bundle],
) -> None:
    from safetensors.torch import load_file

    text, _, bundle = multilingual
    model = transformers.AutoModel.from_pretrained(text).eval()
    hf = transformers.AutoTokenizer.from_pretrained(text)
    weight = load_file(str(text / "2_Dense" / "model.safetensors"))["linear.weight"]
    texts = ["a blue triangle", "蓝色的正方形", "mixed 文字 words", "x"]
    with torch.no_grad():
        tokens = hf(texts, padding=True, return_tensors="pt")
        state = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = (((state * mask).sum(1) / mask.sum(1)) @ weight.T).numpy()
    assert cosines(served(bundle).encode_text(texts), expected).min() >= 0.9999


def test_a_sentence_transformers_model_alone_is_refused_with_the_pairing_hint(
    multilingual: tuple[Path, Path, Bundle], tmp_path: Path
) -> None:
    from clipsearch.export.exporter import ExportError, export_bundle

    text, _, _ = multilingual
    with pytest.raises(ExportError, match=r"--text .* --vision CLIP_CHECKPOINT"):
        export_bundle(text, tmp_path / "out", precisions=("fp32",), progress=lambda _: None)


# --- OpenCLIP -------------------------------------------------------------------------------
# The reference is OpenCLIP itself (open_clip_torch): its model, tokenizer and eval transform,
# loaded from the checkpoint directory as `local-dir:DIR`.


@pytest.fixture(scope="session")
def openclip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Bundle]:
    checkpoint = family_fixtures.openclip_checkpoint(tmp_path_factory)
    precisions = ("fp32", "int8", "int8-static", "fp16")
    bundle = family_fixtures.exported(tmp_path_factory, "openclip", checkpoint, precisions)
    return checkpoint, load_bundle(bundle)


# What OpenCLIP's text cleaning changes (ftfy.fix_text, whitespace, lowercase): full-width
# and ideographic punctuation, curly quotes, ligatures, control characters, odd spaces.
OPENCLIP_EXTRA = [
    "你好，世界！（全角）：１２３　ＡＢＣ",
    "“Curly” ‘quotes’ and ﬁne ligatures",
    "tab\there\u00a0nbsp\u3000ideographic\u2028line",
    "control\x07chars\ufeff and\x00nul",
    "UPPER lower MiXeD, with: punctuation!?",
    "a <end_of_text> inside",
    "don't stop 'til it's done we'll",
]


def test_openclip_manifest_follows_its_preprocessing(openclip: tuple[Path, Bundle]) -> None:
    _, bundle = openclip
    manifest = bundle.manifest
    assert manifest.family == "openclip"
    assert (manifest.vision.resize, manifest.vision.crop, manifest.vision.convert_rgb) == (
        "shortest_edge",
        "center_round",
        "last",
    )
    assert (manifest.vision.image_size, manifest.vision.resample) == (32, "bicubic")
    text = manifest.text
    assert (text.bos_id, text.eos_id, text.pad_id) == (49406, 49407, 0)
    assert (text.context_length, text.padding, text.inputs) == (77, "longest", ("input_ids",))
    assert set(manifest.variants) == {"fp32", "int8", "int8-static", "fp16"}
    assert_parity_recorded(bundle)


def openclip_fuzz_texts(n: int = 300) -> list[str]:
    """Seeded random texts from the characters OpenCLIP's cleaning treats specially, less
    what docs/MODELS.md lists as not reproduced: texts that ftfy's mojibake repair changes,
    and the half-width voicing marks U+FF9E/U+FF9F (combining: after a ligature they fall
    in the grapheme that tokenizers' charsmap replaces whole)."""
    import ftfy
    from ftfy import chardata

    sources = {*chardata.LIGATURES, *chardata.WIDTH_MAP, *chardata.CONTROL_CHARS} - {0xFF9E, 0xFF9F}
    pool = [
        *"abcXYZ019 .,!?'-&é",
        *"红色的圆形世界",
        *(chr(c) for c in sorted(sources)),
        *"\u02bc\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f",
        *"\t\n\r\u00a0\u2028\u3000…—🐱",
        "'s",
        "'ll",
        "e\u0301",
    ]
    rng = np.random.default_rng(10)
    texts = ["".join(rng.choice(pool, size=int(rng.integers(1, 40)))) for _ in range(n)]
    return [t for t in texts if ftfy.fix_text(t) == ftfy.fix_text(t, fix_encoding=False)]


def test_openclip_charsmap_is_ftfys_character_fixes() -> None:
    from ftfy import chardata, fixes
    from tokenizers import normalizers

    from clipsearch.export.families.openclip import ftfy_charsmap

    def fix(text: str) -> str:
        text = fixes.fix_character_width(fixes.fix_latin_ligatures(text))
        return fixes.remove_control_chars(fixes.uncurl_quotes(text))

    charsmap = normalizers.Precompiled(ftfy_charsmap())
    codes = {*chardata.LIGATURES, *chardata.WIDTH_MAP, *chardata.CONTROL_CHARS, 0x2BC}
    codes |= set(range(0x2018, 0x2020)) | set(range(0x20, 0x7F)) | {0x4E00, 0x2026, 0xE9}
    wrong = [hex(c) for c in sorted(codes - {0}) if charsmap.normalize_str(chr(c)) != fix(chr(c))]
    assert wrong == []
    assert len(codes) > 300


def test_openclip_tokenization_equals_open_clip_tokenizer(openclip: tuple[Path, Bundle]) -> None:
    import open_clip

    checkpoint, bundle = openclip
    theirs = open_clip.get_tokenizer(f"local-dir:{checkpoint}")
    texts = TEXTS + OPENCLIP_EXTRA
    reference = theirs(texts)  # [n, 77], zeros after the end token
    ours = TextTokenizer.from_bundle(bundle)
    feeds = ours.pad(ours.tokenize(texts))["input_ids"]
    width = feeds.shape[1]
    np.testing.assert_array_equal(feeds, reference[:, :width].numpy())
    assert not reference[:, width:].any()
    flags = [t.truncated for t in ours.tokenize(texts)]
    assert flags == [False] * 6 + [True, True] + [False] * len(OPENCLIP_EXTRA)
    fuzz = openclip_fuzz_texts()
    assert len(fuzz) > 280
    feeds = ours.pad(ours.tokenize(fuzz))["input_ids"]
    np.testing.assert_array_equal(feeds, theirs(fuzz)[:, : feeds.shape[1]].numpy())


@pytest.mark.parametrize(
    ("resize_mode", "interpolation"),
    [(mode, resample) for mode in ("shortest", "squash") for resample in ("bicubic", "bilinear")],
)
def test_openclip_pixels_equal_its_eval_transform(resize_mode: str, interpolation: str) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from clipsearch.export.families.openclip import vision_spec

    cfg = {
        "size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": interpolation,
        "resize_mode": resize_mode,
    }
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)  # type: ignore[arg-type]
    ours = ImagePreprocessor(vision_spec(cfg), fast_jpeg=False)
    images = [*family_images(), pattern((320, 200), "RGB", 3)]
    worst = max(
        float(np.abs(ours.from_image(image) - theirs(image).numpy()).max()) for image in images
    )
    assert worst <= 1e-6  # torchvision divides by 255 in float32: an ulp from the table


def test_openclip_bundle_pixels_equal_the_models_preprocess(openclip: tuple[Path, Bundle]) -> None:
    import open_clip

    checkpoint, bundle = openclip
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{checkpoint}")
    ours = ImagePreprocessor.from_bundle(bundle, fast_jpeg=False)
    for image in family_images():
        np.testing.assert_allclose(ours.from_image(image), preprocess(image).numpy(), atol=1e-6)


def test_openclip_crop_rounds_offsets_as_torchvision() -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from clipsearch.server.bundle import VisionSpec

    # 320x200 -> 51x32: 19 columns to cut, torchvision starts at round(9.5) = 10, HF at 9.
    spec = VisionSpec(32, 32, (0.5,) * 3, (0.5,) * 3, crop="center_round", convert_rgb="last")
    cfg = PreprocessCfg(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = pattern((320, 200), "RGB", 3)
    theirs = image_transform_v2(cfg, is_train=False)(image).numpy()
    assert np.abs(ImagePreprocessor(spec).from_image(image) - theirs).max() <= 1e-6
    floor = ImagePreprocessor(VisionSpec(32, 32, (0.5,) * 3, (0.5,) * 3)).from_image(image)
    assert np.abs(floor - theirs).max() > 0.1


@pytest.mark.parametrize(
    ("precision", "bar"), [("fp32", 0.9999), ("int8", 0.99), ("int8-static", 0.99)]
)
def test_openclip_served_vectors_equal_open_clip(
    openclip: tuple[Path, Bundle], precision: str, bar: float
) -> None:
    import open_clip

    checkpoint, bundle = openclip
    name = f"local-dir:{checkpoint}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    texts = ["a photo of a cat", "一只红色的猫，在草地上", "mixed 文字 “quoted”", "x", "long " * 90]
    images = [Image.open(io.BytesIO(b)) for b in fresh_images()]
    with torch.no_grad():
        text = model.eval().encode_text(tokenizer(texts)).numpy()
        image = model.encode_image(torch.stack([preprocess(i) for i in images])).numpy()
    encoder = OnnxEncoder(bundle, EncoderOptions(warmup=False, precision=precision))
    assert encoder.precision == precision
    assert cosines(encoder.encode_text(texts), text).min() >= bar
    pre = [encoder.preprocessor(b) for b in fresh_images()]
    assert cosines(encoder.encode_images(pre), image).min() >= bar


def test_openclip_text_tower_without_causal_mask_keeps_the_full_context(tmp_path: Path) -> None:
    """Pads are attended to without the causal mask: the server must pad to 77, as OpenCLIP."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from clipsearch.export.exporter import export_bundle

    cfg = json.loads(json.dumps(family_fixtures.OPENCLIP_CFG))
    cfg["model_cfg"]["text_cfg"]["no_causal_mask"] = True
    checkpoint = tmp_path / "bidirectional"
    checkpoint.mkdir()
    (checkpoint / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(1)
    save_file(
        open_clip.CLIP(**cfg["model_cfg"]).state_dict(),
        checkpoint / "open_clip_model.safetensors",
    )
    export_bundle(checkpoint, tmp_path / "out", precisions=("fp32",), progress=lambda _: None)
    bundle = load_bundle(tmp_path / "out")
    assert bundle.manifest.text.padding == "max_length"
    assert_parity_recorded(bundle)
    name = f"local-dir:{checkpoint}"
    model = open_clip.create_model(name).eval()
    texts = ["a photo of a cat", "x", "红色的圆形"]
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer(name)(texts)).numpy()
    assert cosines(served(bundle).encode_text(texts), expected).min() >= 0.9999


def test_an_openclip_hub_name_is_downloaded_then_exported(
    openclip: tuple[Path, Bundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hf-hub:ORG/REPO` fetches the config and one weight file (safetensors, else the .bin)."""
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    from clipsearch.export.exporter import export_bundle

    checkpoint, _ = openclip
    hub = tmp_path / "hub"  # the repository: the config and only the pickled weights
    hub.mkdir()
    shutil.copy(checkpoint / "open_clip_config.json", hub)
    torch.save(
        load_file(checkpoint / "open_clip_model.safetensors"), hub / "open_clip_pytorch_model.bin"
    )
    snapshot = tmp_path / "cache" / "snapshot"
    asked: list[tuple[str, str, Any]] = []

    def hf_hub_download(repo: str, filename: str, revision: Any) -> str:
        asked.append((repo, filename, revision))
        if not (hub / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo}")
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(hub / filename, snapshot))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    out = tmp_path / "bundle"
    export_bundle("hf-hub:laion/tiny", out, precisions=("fp32",), progress=lambda _: None)
    assert asked == [
        ("laion/tiny", "open_clip_config.json", None),
        ("laion/tiny", "open_clip_model.safetensors", None),
        ("laion/tiny", "open_clip_pytorch_model.bin", None),
    ]
    manifest = load_bundle(out).manifest
    assert (manifest.family, manifest.name, manifest.source) == (
        "openclip",
        "tiny",
        "hf-hub:laion/tiny",
    )
    assert_parity_recorded(load_bundle(out))


def test_an_unreachable_openclip_hub_name_is_an_export_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from clipsearch.export.exporter import ExportError, export_bundle

    def offline(repo: str, filename: str, revision: Any) -> str:
        raise OSError("no connection to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        ExportError,
        match=r"cannot download the OpenCLIP checkpoint hf-hub:laion/x: no connection",
    ):
        export_bundle("hf-hub:laion/x", tmp_path / "out", precisions=("fp32",), progress=print)


def test_an_unsupported_openclip_model_names_what_differs(
    openclip: tuple[Path, Bundle], tmp_path: Path
) -> None:
    import json
    import shutil

    from clipsearch.export.exporter import ExportError, export_bundle

    checkpoint, _ = openclip
    odd = tmp_path / "xlm-roberta"
    shutil.copytree(checkpoint, odd)
    config = json.loads((odd / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "xlm-roberta-base"
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "xlm-roberta-base"
    (odd / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"text_cfg.hf_model_name=.*text_cfg.hf_tokenizer_name"):
        export_bundle(odd, tmp_path / "out", precisions=("fp32",), progress=lambda _: None)


def test_openclip_weights_that_do_not_fit_their_config_are_refused(
    openclip: tuple[Path, Bundle], tmp_path: Path
) -> None:
    import json
    import shutil

    from clipsearch.export.exporter import ExportError, export_bundle

    checkpoint, _ = openclip
    odd = tmp_path / "wider"
    shutil.copytree(checkpoint, odd)
    config = json.loads((odd / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["width"] = 64
    (odd / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"OpenCLIP could not load .*wider: Error") as caught:
        export_bundle(odd, tmp_path / "out", precisions=("fp32",), progress=lambda _: None)
    assert "size mismatch for visual.class_embedding" in str(caught.value)
    assert len(str(caught.value)) < 700


# --- what the exporter refuses, what it handles by kind, the strict setting -----------------


def test_an_unsupported_checkpoint_is_named_with_what_is_supported(tmp_path: Path) -> None:
    from clipsearch.export.exporter import ExportError, export_bundle

    transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ExportError) as caught:
        export_bundle(
            tmp_path / "bert", tmp_path / "out", precisions=("fp32",), progress=lambda _: None
        )
    message = str(caught.value)
    assert "is a 'bert' model; supported: CLIP (CLIPModel" in message
    for family in ("Chinese-CLIP", "SigLIP", "OpenCLIP", "sentence-transformers", "--vision"):
        assert family in message


def test_a_clip_model_with_a_wordpiece_tokenizer_exports_by_tokenizer_kind(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from clipsearch.export.demo_wordpiece import build_demo_wordpiece_tokenizer
    from clipsearch.export.tokenizers import tiny_clip_config

    root = tmp_path_factory.mktemp("clip-wordpiece")
    tokenizer = build_demo_wordpiece_tokenizer()
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    config = tiny_clip_config(text_config={"vocab_size": len(tokenizer), **ids})
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root / "ckpt")
    bundle = load_bundle(
        family_fixtures.exported(tmp_path_factory, "clip-wordpiece", root / "ckpt")
    )
    assert bundle.manifest.family == "clip"
    assert (bundle.manifest.text.bos_id, bundle.manifest.text.eos_id) == (2, 3)  # [CLS], [SEP]
    assert bundle.manifest.text.inputs == ("input_ids",)
    assert_parity_recorded(bundle)


def test_strict_text_length_is_a_server_setting(chinese_clip: tuple[Path, Bundle]) -> None:
    from clipsearch.server.settings import Settings

    _, bundle = chinese_clip
    settings = Settings.from_env({"CLIPSEARCH_STRICT_TEXT_LENGTH": "1"})
    options = EncoderOptions.from_settings(settings)
    assert options.strict_text_length
    strict = OnnxEncoder(bundle, EncoderOptions(warmup=False, strict_text_length=True))
    with pytest.raises(InvalidInput, match="over the model's context of 52"):
        strict.encode_text(["一" * 51])
    lenient = served(bundle)
    assert lenient.tokenizer.tokenize(["一" * 51])[0].truncated
    assert lenient.encode_text(["一" * 51]).shape == (1, family_fixtures.PROJECTION)


@pytest.mark.parametrize(
    ("checkpoint", "text", "vision", "message"),
    [
        ("ckpt", "st-model", "clip", "give the checkpoint or --text, not both"),
        ("", "st-model", "", "--text and --vision go together"),
        ("ckpt", "", "clip", "--text and --vision go together"),
        ("", "", "", "give a checkpoint"),
    ],
)
def test_export_command_checks_its_checkpoint_arguments(
    checkpoint: str, text: str, vision: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from clipsearch.export.exporter import main

    args = argparse.Namespace(
        checkpoint=checkpoint,
        text=text,
        vision=vision,
        out="unused",
        precision="fp32",
        opset=17,
        name="",
        revision="",
    )
    assert main(args) == 2
    assert message in capsys.readouterr().err
