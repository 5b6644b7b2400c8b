"""`clipsearch export`: a checkpoint of a supported family -> a model bundle, accepted on parity.

    export_bundle(checkpoint, out, precisions, opset, name, vision=None) -> Manifest

writes text.onnx / vision.onnx (+ text.<precision>.onnx ... per extra variant),
tokenizer.json and, only when every variant meets its parity bar, manifest.json. A bundle
without a manifest is not loadable, so a failed export can never be served by accident.
The family adapters (`clipsearch.export.families`) load the towers, the tokenizer and the
image rule; everything here is the same for every family.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.export.families.base import ExportError, FamilyModel
from clipsearch.server.bundle import (
    BATCH_INVARIANCE_MIN_COSINE,
    MANIFEST_FILE,
    PARITY_BARS,
    PRECISIONS,
    Manifest,
    Parity,
    TextSpec,
    Variant,
    VisionSpec,
)

if TYPE_CHECKING:
    from clipsearch.export.parity import Reference

__all__ = ["ExportError", "ParityFailure", "export_bundle", "variant_files"]

TOKENIZER_FILE = "tokenizer.json"
# Batch of one vs the same item in a batch, L2-normalized, fp32 (the encoder's contract).
BATCH_INVARIANCE_BAR = 1e-5

Progress = Callable[[str], None]


class ParityFailure(ExportError):
    """One or more variants missed their parity bar; the ONNX files are left for inspection."""

    def __init__(self, misses: Sequence[str]) -> None:
        self.misses = tuple(misses)
        super().__init__("parity check failed:\n  " + "\n  ".join(self.misses))


def variant_files(precision: str) -> tuple[str, str]:
    if precision == "fp32":
        return "text.onnx", "vision.onnx"
    return f"text.{precision}.onnx", f"vision.{precision}.onnx"


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    precisions: Sequence[str] = ("fp32", "int8", "int8-static"),
    opset: int = 17,
    name: str = "",
    *,
    vision: str | Path | None = None,
    revision: str = "",
    calibration: str | Path | None = None,
    source: str = "",
    evaluation: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Export, check parity, and write the bundle; returns its manifest.

    `checkpoint` is a local directory or a hub id of a supported family (see
    `clipsearch.export.families.load_family`); with `vision`, `checkpoint` is a
    sentence-transformers text model and `vision` the CLIP checkpoint whose vision tower
    pairs with it. fp32 is always exported: it is the base of the other variants. `source`
    (default: the hub id, or the directory's name) and `evaluation` (held-out quality
    figures, e.g. from the demo training) go in the manifest. `calibration` (a directory or
    manifest of images and texts, see `clipsearch.export.calibration.load_calibration`)
    calibrates int8-static instead of the built-in set. Raises ExportError (ParityFailure
    when a bar is missed).
    """
    from clipsearch.export.families import load_family

    say = progress or _stderr_progress
    wanted = _precisions(precisions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)

    step = _Steps(say, total=3 + 2 * len(wanted))
    loading = f"text {checkpoint}, vision {vision}" if vision else str(checkpoint)
    with step("loading checkpoint " + loading):
        loaded = load_family(checkpoint, revision, vision=vision)
    text_spec, vision_spec = loaded.text_spec, loaded.vision_spec

    with step("writing tokenizer.json and checking it against the family's tokenizer"):
        (out / TOKENIZER_FILE).write_text(loaded.tokenizer_json, encoding="utf-8")
        _check_tokenizer(loaded, out / TOKENIZER_FILE)

    with step(f"exporting the fp32 towers to ONNX (opset {opset})"):
        _export_fp32(loaded, out, opset)
    quantization: dict[str, dict[str, str]] = {}
    for precision in wanted:
        if precision == "int8-static":
            with step("making the int8-static variant (calibrating activation scales)"):
                from clipsearch.export.quantize_static import make_bundle_variant

                quantization[precision] = make_bundle_variant(
                    out,
                    variant_files("fp32"),
                    variant_files(precision),
                    text_spec=text_spec,
                    vision_spec=vision_spec,
                    tokenizer_file=out / TOKENIZER_FILE,
                    calibration=calibration,
                )
        elif precision != "fp32":
            with step(f"making the {precision} variant"):
                _make_variant(out, precision)
    _remove_stale_variants(out, wanted)

    with step("PyTorch reference embeddings on the parity inputs"):
        from clipsearch.export.parity import parity_images, torch_reference

        images = parity_images()
        reference = torch_reference(loaded, images)
    variants: dict[str, Variant] = {}
    misses: list[str] = []
    for precision in wanted:
        with step(f"parity of the {precision} variant (ONNX Runtime, CPU)"):
            variant, variant_misses = _check_variant(
                out,
                precision,
                text_spec=text_spec,
                vision_spec=vision_spec,
                reference=reference,
                images=[i.data for i in images],
                say=say,
            )
        if precision in quantization:
            variant = dataclasses.replace(variant, quantization=quantization[precision])
        variants[precision] = variant
        misses += variant_misses
    if misses:
        raise ParityFailure(misses)

    sources = loaded.sources
    manifest = Manifest(
        name=name or _default_name(checkpoint),
        family=loaded.family,
        source=source
        or (
            f"text: {sources['text']}; vision: {sources['vision']}"
            if sources
            else _default_source(checkpoint)
        ),
        dim=int(reference.text.shape[1]),
        opset=opset,
        model_id="",
        text=text_spec,
        vision=vision_spec,
        variants=variants,
        revision=revision,
        tokenizer_file=TOKENIZER_FILE,
        created_with=_created_with(wanted),
        evaluation=dict(evaluation or {}),
        sources=dict(sources),
    )
    manifest = _with_model_id(manifest, out)
    manifest.validate()
    (out / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    say(f"export: bundle written to {out} (model_id {manifest.model_id})")
    return manifest


def main(args: argparse.Namespace) -> int:
    """Handler of `clipsearch export`."""
    precisions = [p.strip().lower() for p in str(args.precision).split(",") if p.strip()]
    text_arg, vision_arg = getattr(args, "text", ""), getattr(args, "vision", "")
    text = text_arg or args.checkpoint
    problem = ""
    if text_arg and args.checkpoint:
        problem = "give the checkpoint or --text, not both"
    elif not text:
        problem = "give a checkpoint (or --text CKPT --vision CKPT)"
    elif bool(text_arg) != bool(vision_arg):
        problem = "--text and --vision go together (a text model + a CLIP vision tower)"
    if problem:
        print(f"clipsearch export: {problem}", file=sys.stderr)
        return 2
    try:
        manifest = export_bundle(
            text,
            args.out,
            precisions=precisions,
            opset=args.opset,
            name=args.name,
            vision=vision_arg or None,
            revision=args.revision,
            calibration=getattr(args, "calibration", None) or None,
        )
    except ExportError as exc:
        print(f"clipsearch export: {exc}", file=sys.stderr)
        return 1
    for precision, variant in manifest.variants.items():
        print(
            f"{precision}: text min cosine {variant.text_parity.min_cosine:.6f}, "
            f"vision min cosine {variant.vision_parity.min_cosine:.6f} "
            f"(bar {PARITY_BARS[precision]})"
        )
    return 0


# --- tokenizer and graphs --------------------------------------------------------------


def _check_tokenizer(loaded: FamilyModel, tokenizer_file: Path) -> None:
    """The server's padded feeds equal the family's own tokenization, input by input."""
    import numpy as np

    from clipsearch.export.parity import PARITY_TEXTS
    from clipsearch.server.text import TextTokenizer

    server = TextTokenizer(tokenizer_file, loaded.text_spec)
    for texts in (PARITY_TEXTS, *((text,) for text in PARITY_TEXTS)):
        ours = server.pad(server.tokenize(texts))
        theirs = loaded.tokenize(texts)
        for name in loaded.text_spec.inputs:
            mine, ref = ours[name], theirs[name].numpy()
            if mine.shape != ref.shape or not np.array_equal(mine, ref):
                row = next(
                    (
                        i
                        for i in range(min(len(mine), len(ref)))
                        if not np.array_equal(mine[i], ref[i])
                    ),
                    0,
                )
                raise ExportError(
                    f"the server tokenizer disagrees with the {loaded.family} tokenizer on "
                    f"{texts[row][:40]!r} ({name}): {mine[row].tolist()[:12]} vs "
                    f"{ref[row].tolist()[:12]}"
                )


def _export_fp32(loaded: FamilyModel, out: Path, opset: int) -> None:
    from clipsearch.export.towers import export_text_tower, export_vision_tower

    text_file, vision_file = variant_files("fp32")
    # Two rows of different lengths, padded: the trace sees pooling and padding.
    example = loaded.tokenize(["a photo of a cat", "a photo of a red circle next to a blue square"])
    export_text_tower(
        loaded.text_tower,
        out / text_file,
        opset,
        [example[n] for n in loaded.text_spec.inputs],
        loaded.text_spec.inputs,
        max_sequence=loaded.text_spec.context_length if loaded.text_export_dynamo else None,
    )
    export_vision_tower(
        loaded.vision_tower, out / vision_file, opset, loaded.vision_spec.image_size
    )


def _make_variant(out: Path, precision: str) -> None:
    from clipsearch.export.variants import make_fp16, make_int8

    make = {"int8": make_int8, "fp16": make_fp16}[precision]
    for base, target in zip(variant_files("fp32"), variant_files(precision), strict=True):
        make(out / base, out / target)


def _remove_stale_variants(out: Path, wanted: Sequence[str]) -> None:
    for precision in PRECISIONS:
        if precision not in wanted:
            for file in variant_files(precision):
                (out / file).unlink(missing_ok=True)


# --- parity -------------------------------------------------------------------------------


def _check_variant(
    out: Path,
    precision: str,
    *,
    text_spec: TextSpec,
    vision_spec: VisionSpec,
    reference: Reference,
    images: Sequence[bytes],
    say: Progress,
) -> tuple[Variant, list[str]]:
    from clipsearch.export.parity import (
        INVARIANCE_BATCH,
        PARITY_TEXTS,
        OnnxTowers,
        batch_invariance,
        batch_invariance_cosine,
        compare,
        invariance_images,
        invariance_texts,
    )

    text_file, vision_file = variant_files(precision)
    towers = OnnxTowers.load(
        out / text_file,
        out / vision_file,
        out / TOKENIZER_FILE,
        text_spec,
        vision_spec,
        precision=precision,
    )
    pixels = towers.preprocess(images)
    text_parity = compare(reference.text, towers.encode_texts(PARITY_TEXTS))
    vision_parity = compare(reference.image, towers.run_vision(pixels))
    misses = [
        _miss(tower, precision, parity)
        for tower, parity in (("text", text_parity), ("vision", vision_parity))
        if parity.min_cosine < PARITY_BARS[precision]
    ]
    batch_text = batch_invariance(towers.encode_texts, PARITY_TEXTS)
    batch_vision = batch_invariance(towers.run_vision, pixels)
    invariance = {
        "text_min_cosine": batch_invariance_cosine(towers.encode_texts, invariance_texts()),
        "vision_min_cosine": batch_invariance_cosine(
            towers.run_vision, towers.preprocess(invariance_images())
        ),
        "batch_size": float(INVARIANCE_BATCH),
    }
    say(
        f"export:   {precision}: text min cosine {text_parity.min_cosine:.6f}, vision min "
        f"cosine {vision_parity.min_cosine:.6f} (bar {PARITY_BARS[precision]}); alone vs in a "
        f"batch of {INVARIANCE_BATCH}: text {invariance['text_min_cosine']:.7f}, vision "
        f"{invariance['vision_min_cosine']:.7f}"
    )
    if precision == "fp32":
        # Dynamic int8 shares one activation scale per batch, so it is not batch-invariant
        # (its figures are recorded, not gated); fp16 on CPU is checked by its cosine bar.
        misses += [
            f"fp32 {tower} tower: an item alone differs from its row in a batch by {diff:.2e} "
            f"(bar {BATCH_INVARIANCE_BAR:.0e})"
            for tower, diff in (("text", batch_text), ("vision", batch_vision))
            if diff > BATCH_INVARIANCE_BAR
        ]
    if precision == "int8-static":
        misses += [
            f"int8-static {tower} tower: an item alone vs in a batch of {INVARIANCE_BATCH}: "
            f"min cosine {invariance[tower + '_min_cosine']:.7f} is "
            f"{BATCH_INVARIANCE_MIN_COSINE - invariance[tower + '_min_cosine']:.2e} below the "
            f"bar {BATCH_INVARIANCE_MIN_COSINE}"
            for tower in ("text", "vision")
            if invariance[tower + "_min_cosine"] < BATCH_INVARIANCE_MIN_COSINE
        ]
    variant = Variant(
        precision=precision,
        text_file=text_file,
        vision_file=vision_file,
        text_parity=text_parity,
        vision_parity=vision_parity,
        batch_invariance={k: round(v, 9) for k, v in invariance.items()},
    )
    return variant, misses


def _miss(tower: str, precision: str, parity: Parity) -> str:
    bar = PARITY_BARS[precision]
    return (
        f"{precision} {tower} tower: min cosine {parity.min_cosine:.6f} is "
        f"{bar - parity.min_cosine:.6f} below the bar {bar}"
    )


# --- manifest -----------------------------------------------------------------------------


def _precisions(precisions: Sequence[str]) -> list[str]:
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision {unknown}; choose from {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p == "fp32" or p in precisions]


def _default_name(checkpoint: str | Path) -> str:
    return Path(str(checkpoint)).name or str(checkpoint)


def _default_source(checkpoint: str | Path) -> str:
    path = Path(checkpoint)
    return path.name if path.is_dir() else str(checkpoint)


def _with_model_id(manifest: Manifest, out: Path) -> Manifest:
    """name + sha256 prefix of the fp32 graphs: changes whenever the weights do."""
    import dataclasses

    digest = hashlib.sha256()
    for file in variant_files("fp32"):
        with (out / file).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return dataclasses.replace(manifest, model_id=f"{manifest.name}-{digest.hexdigest()[:16]}")


def _created_with(precisions: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for package in ("clipsearch", "torch", "transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    versions["pillow"] = version("pillow")
    if "fp16" in precisions:
        versions["fp16_parity"] = (
            "measured with onnxruntime's CPUExecutionProvider, which runs ops lacking fp16 CPU "
            "kernels (MatMul, Add, ...) in fp32 between inserted Casts: the figures cover fp16 "
            "weights and fp16 activations between ops, not GPU fp16 arithmetic"
        )
    return versions


class _Steps:
    """`with step("..."):` prints the step when it starts and its time when it ends."""

    def __init__(self, say: Progress, total: int) -> None:
        self._say = say
        self._total = total
        self._n = 0

    def __call__(self, what: str) -> _Step:
        self._n += 1
        return _Step(self._say, f"[{self._n}/{self._total}] {what}")


class _Step:
    def __init__(self, say: Progress, label: str) -> None:
        self._say = say
        self._label = label
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()
        self._say(f"export: {self._label} ...")

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._say(f"export: {self._label}: done in {time.perf_counter() - self._start:.1f}s")


def _stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
