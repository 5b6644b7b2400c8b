"""The model bundle: the only contract between export (torch) and serving (onnxruntime).

A bundle is a directory:

    manifest.json      this module's `Manifest`
    tokenizer.json     a `tokenizers` tokenizer (byte-level BPE for CLIP, WordPiece for
                       BERT-style towers, SentencePiece Unigram for SigLIP)
    text.onnx          text.inputs, each int64 [batch, seq] (input_ids; attention_mask,
                       token_type_ids where listed) -> text_embeds[batch, dim]
    vision.onnx        pixel_values[batch, 3, H, W] float32 -> image_embeds[batch, dim]
    text.int8.onnx ... one pair of files per extra precision variant

Embeddings leave the graphs unnormalized; the server L2-normalizes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.server.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# int8: dynamic quantization (activation scales per batch); int8-static: scales calibrated
# at export, so a vector does not depend on its batch-mates.
PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
# Parity bars (min cosine, PyTorch vs ONNX Runtime) an export must meet to be accepted.
PARITY_BARS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99, "int8-static": 0.99}
# An item alone vs its row in a batch of 32 (min cosine): the bar for a variant that the
# server may pick by itself (`--precision auto`).
BATCH_INVARIANCE_MIN_COSINE = 0.99999


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_PADDINGS = ("longest", "max_length")
# shortest_edge: the shortest edge to resize_shortest_edge, aspect kept, then the crop;
# squash: straight to image_size x image_size (Chinese-CLIP, SigLIP), no crop.
RESIZE_RULES = ("shortest_edge", "squash")
# center: transformers' offsets ((size - crop) // 2, zero padding where the image is
# smaller); center_round: torchvision's (round((size - crop) / 2)), as OpenCLIP crops.
CROP_RULES = ("center", "center_round", "none")
# first: converted to RGB on decoding, transparency composited onto white (transformers'
# convert_to_rgb); last: resized and cropped in the image's own mode, then Pillow's
# convert("RGB"), alpha dropped (OpenCLIP's torchvision pipeline).
RGB_RULES = ("first", "last")


@dataclass(frozen=True)
class TextSpec:
    context_length: int
    bos_id: int | None  # None: no start token (SigLIP)
    eos_id: int
    pad_id: int
    # The ONNX inputs in order. CLIP needs only input_ids (causal mask: pads after EOS
    # cannot reach it); BERT-style towers list attention_mask / token_type_ids too.
    inputs: tuple[str, ...] = ("input_ids",)
    # Longer texts keep their first tokens and still end with EOS.
    truncation: str = "keep_start"
    # longest: a batch is padded to its longest text; max_length: every text to
    # context_length (SigLIP pools the last position, so it was trained that way).
    padding: str = "longest"


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    resize_shortest_edge: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"
    crop: str = "center"
    rescale_factor: float = 1.0 / 255.0
    inputs: tuple[str, ...] = ("pixel_values",)
    resize: str = "shortest_edge"
    convert_rgb: str = "first"


@dataclass(frozen=True)
class Parity:
    """PyTorch vs ONNX Runtime on the fixed export inputs, per tower."""

    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    n_inputs: int


@dataclass(frozen=True)
class Variant:
    precision: str
    text_file: str
    vision_file: str
    text_parity: Parity
    vision_parity: Parity
    # {"text_min_cosine", "vision_min_cosine", "batch_size"}: alone vs in a batch.
    batch_invariance: dict[str, float] = field(default_factory=dict)
    # How a quantized variant was made (method, calibration set, ops left in fp32).
    quantization: dict[str, str] = field(default_factory=dict)

    def is_batch_invariant(self) -> bool:
        figures = [self.batch_invariance.get(f"{t}_min_cosine") for t in ("text", "vision")]
        return all(f is not None and f >= BATCH_INVARIANCE_MIN_COSINE for f in figures)


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    source: str
    dim: int
    opset: int
    model_id: str
    text: TextSpec
    vision: VisionSpec
    variants: dict[str, Variant]
    format_version: int = FORMAT_VERSION
    revision: str = ""
    tokenizer_file: str = "tokenizer.json"
    created_with: dict[str, str] = field(default_factory=dict)
    # Quality measured on held-out data where the exporter had some (the demo model).
    evaluation: dict[str, float] = field(default_factory=dict)
    # Per tower where they differ (a multilingual text tower + a CLIP vision tower):
    # {"text": checkpoint, "vision": checkpoint}; `source` then names both.
    sources: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        try:
            version = int(raw.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise BundleError(
                    f"manifest format_version {version} is not supported "
                    f"(this clipsearch reads {FORMAT_VERSION})"
                )
            variants = {
                name: Variant(
                    precision=v["precision"],
                    text_file=v["text_file"],
                    vision_file=v["vision_file"],
                    text_parity=Parity(**v["text_parity"]),
                    vision_parity=Parity(**v["vision_parity"]),
                    batch_invariance={
                        k: float(x) for k, x in v.get("batch_invariance", {}).items()
                    },
                    quantization={k: str(x) for k, x in v.get("quantization", {}).items()},
                )
                for name, v in raw["variants"].items()
            }
            text = dict(raw["text"])
            text["inputs"] = tuple(text.get("inputs", ("input_ids",)))
            vision = dict(raw["vision"])
            if len(vision["mean"]) != 3 or len(vision["std"]) != 3:
                raise BundleError("manifest is invalid: vision.mean and vision.std need 3 channels")
            vision["mean"] = tuple(vision["mean"])
            vision["std"] = tuple(vision["std"])
            vision["inputs"] = tuple(vision.get("inputs", ("pixel_values",)))
            manifest = cls(
                name=raw["name"],
                family=raw["family"],
                source=raw["source"],
                dim=int(raw["dim"]),
                opset=int(raw["opset"]),
                model_id=raw["model_id"],
                text=TextSpec(**text),
                vision=VisionSpec(**vision),
                variants=variants,
                format_version=version,
                revision=raw.get("revision", ""),
                tokenizer_file=raw.get("tokenizer_file", "tokenizer.json"),
                created_with=dict(raw.get("created_with", {})),
                evaluation=dict(raw.get("evaluation", {})),
                sources=dict(raw.get("sources", {})),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {exc!r}") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        problems: list[str] = []
        if self.dim <= 0:
            problems.append(f"dim must be positive, got {self.dim}")
        if not self.variants:
            problems.append("no precision variants")
        for name, variant in self.variants.items():
            if name != variant.precision or name not in PRECISIONS:
                problems.append(f"variant {name!r} has precision {variant.precision!r}")
        if self.text.context_length < 2:
            problems.append(f"text.context_length too small: {self.text.context_length}")
        if "input_ids" not in self.text.inputs or set(self.text.inputs) - set(TEXT_INPUTS):
            problems.append(f"text.inputs {list(self.text.inputs)} (known: {list(TEXT_INPUTS)})")
        if self.text.padding not in TEXT_PADDINGS:
            problems.append(f"text.padding {self.text.padding!r} is not one of {TEXT_PADDINGS}")
        if self.vision.resize not in RESIZE_RULES:
            problems.append(f"vision.resize {self.vision.resize!r} is not one of {RESIZE_RULES}")
        if self.vision.crop not in CROP_RULES:
            problems.append(f"vision.crop {self.vision.crop!r} is not one of {CROP_RULES}")
        if (self.vision.resize == "squash") != (self.vision.crop == "none"):
            problems.append("vision: a squash resize has no crop, a shortest_edge resize one")
        if self.vision.convert_rgb not in RGB_RULES:
            problems.append(
                f"vision.convert_rgb {self.vision.convert_rgb!r} is not one of {RGB_RULES}"
            )
        if any(s <= 0 for s in self.vision.std):
            problems.append("vision.std must be positive")
        if self.vision.image_size <= 0 or self.vision.resize_shortest_edge <= 0:
            problems.append("vision sizes must be positive")
        if problems:
            raise BundleError("manifest is invalid: " + "; ".join(problems))


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest.tokenizer_file

    def variant(self, precision: str) -> Variant:
        try:
            return self.manifest.variants[precision]
        except KeyError:
            have = ", ".join(sorted(self.manifest.variants))
            raise BundleError(
                f"bundle {self.root} has no {precision} variant (it has: {have})"
            ) from None


def load_bundle(root: str | Path) -> Bundle:
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST_FILE} is missing")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    manifest = Manifest.from_dict(raw)
    missing = [
        name
        for variant in manifest.variants.values()
        for name in (variant.text_file, variant.vision_file)
        if not (root / name).is_file()
    ]
    if not (root / manifest.tokenizer_file).is_file():
        missing.append(manifest.tokenizer_file)
    if missing:
        raise BundleError(f"bundle {root} lacks files named in its manifest: {missing}")
    return Bundle(root=root, manifest=manifest)


def default_bundle_path() -> Path:
    """The demo model committed with the package: the server's default."""
    return committed_bundle_path("demo")


def committed_bundle_path(name: str) -> Path:
    """A model committed with the package: "demo" (CLIP) or "demo-zh" (Chinese-CLIP)."""
    return Path(__file__).resolve().parent / "models" / name
