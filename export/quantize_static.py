"""The int8-static variant: QDQ static quantization with scales calibrated at export.

Dynamic int8 computes each activation's scale from the batch it is in, so a vector depends
on its batch-mates. Here every scale is fixed at export from a calibration set, so an item
gets the same integer arithmetic alone or in a batch of 32 (the exporter gates on it).

What is quantized was chosen by measurement (docs/MODELS.md, "int8-static", has the table):
every MatMul but the final projection (the Linear layers and attention's two products),
weights int8 per output channel with 7 bits (`reduce_range`), activations uint8 per tensor.
Left in fp32: LayerNorm and Softmax (quantizing them wrecks the text tower), the token
embedding, the patch-embedding Conv and the projection into the embedding space.
Calibration: the 99.999th percentile of each activation's magnitudes (MinMax stretches the
8-bit grid over CLIP's rare large activations; 99.99 clips too much). 7-bit weights because
x86 CPUs without VNNI (AVX2 only) multiply u8 x s8 with `vpmaddubsw`, whose 16-bit pair sums
saturate with full 8-bit weights (the tiny test CLIP's text parity fell to 0.948); VNNI CPUs
lose nothing by them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.server.bundle import TextSpec, VisionSpec


@dataclass(frozen=True)
class StaticConfig:
    """The knobs measured; the defaults are the chosen ones."""

    method: str = "percentile"  # percentile | minmax | entropy
    activations: str = "uint8"  # uint8 | int8
    reduce_range: bool = True
    # Which MatMuls become int8: "weights" (constant B: the Linear layers) or "all"
    # (attention's activation x activation products too).
    matmuls: str = "all"
    keep_projection_fp32: bool = True
    quantize_conv: bool = False
    extra_op_types: tuple[str, ...] = ()  # e.g. ("Softmax", "LayerNormalization", "Gather")
    percentile: float = 99.999

    def describe(self) -> dict[str, str]:
        kept = ["attention MatMuls"] if self.matmuls == "weights" else []
        kept += [] if self.quantize_conv else ["patch Conv"]
        kept += ["projection"] if self.keep_projection_fp32 else []
        kept += [
            op
            for op in ("Softmax", "LayerNormalization", "Gather")
            if op not in self.extra_op_types
        ]
        return {
            "format": "QDQ",
            "method": self.method + (f" {self.percentile}" if self.method == "percentile" else ""),
            "activations": f"{self.activations} per tensor, static",
            "weights": "int8 per channel" + (", 7-bit (reduce_range)" if self.reduce_range else ""),
            "fp32": ", ".join(kept),
        }


@dataclass
class _Feeds:
    """An ONNX Runtime CalibrationDataReader over prepared feed dicts."""

    feeds: list[dict[str, np.ndarray]]
    _iter: Iterator[dict[str, np.ndarray]] | None = field(default=None, repr=False)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = iter(self.feeds)
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def text_feeds(
    tokenizer_file: Path, spec: TextSpec, texts: Sequence[str], pad_to: int = 0
) -> list[dict[str, np.ndarray]]:
    """One text per feed, unpadded: padding after EOS never reaches the pooled output, so
    its activations must not widen the calibrated ranges. `pad_to` pads every feed to one
    length (ONNX Runtime's histogram calibrators need equal shapes)."""
    from clipsearch.server.text import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_file, spec)
    feeds = [tokenizer.pad([tokens]) for tokens in tokenizer.tokenize(texts)]
    if pad_to:
        for feed in feeds:
            for name, array in feed.items():
                fill = spec.pad_id if name == "input_ids" else 0
                width = pad_to - array.shape[1]
                feed[name] = np.pad(array, ((0, 0), (0, width)), constant_values=fill)
    return feeds


def vision_feeds(
    spec: VisionSpec, images: Sequence[bytes], input_name: str = "pixel_values"
) -> list[dict[str, np.ndarray]]:
    from clipsearch.export.calibration import batches
    from clipsearch.server.images import ImagePreprocessor

    preprocess = ImagePreprocessor(spec, fast_jpeg=False)
    pixels = [preprocess(data) for data in images]
    # One image per feed: ONNX Runtime's histogram calibrators need equal shapes throughout.
    return [{input_name: b} for b in batches(pixels, 1)]


def make_int8_static(
    fp32: Path,
    out: Path,
    feeds: list[dict[str, np.ndarray]],
    config: StaticConfig | None = None,
) -> Path:
    """Quantize one tower graph `fp32` into `out`, calibrated on `feeds`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    config = config or StaticConfig()
    model = onnx.load(str(fp32))
    op_types = ["MatMul"] + (["Conv"] if config.quantize_conv else []) + list(config.extra_op_types)
    exclude = [_projection_node(model)] if config.keep_projection_fp32 else []
    if config.matmuls == "weights":
        # ORT's QDQ MatMul quantizer ignores MatMulConstBOnly: name attention's products.
        exclude += _activation_matmuls(model)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[config.method]
    extra: dict[str, Any] = {}
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    activation = QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8
    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    try:
        # The calibrator writes an augmented copy of the graph next to its working files.
        with tempfile.TemporaryDirectory(prefix="clipsearch-calibrate-") as scratch:
            staged = Path(scratch) / fp32.name
            onnx.save(model, str(staged))
            quantize_static(
                model_input=staged,
                model_output=out,
                calibration_data_reader=_Feeds(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=True,
                reduce_range=config.reduce_range,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=method,
                extra_options=extra,
            )
    finally:
        quant_logger.setLevel(level)
    return out


def make_bundle_variant(
    out_dir: Path,
    files_fp32: tuple[str, str],
    files_int8: tuple[str, str],
    *,
    text_spec: TextSpec,
    vision_spec: VisionSpec,
    tokenizer_file: Path,
    calibration: str | Path | None = None,
    config: StaticConfig | None = None,
) -> dict[str, str]:
    """Both towers of a bundle directory (text.onnx -> text.int8-static.onnx, vision
    likewise), calibrated on `calibration` (a directory or manifest; None: the built-in
    set). Returns how it was made, for the manifest."""
    from clipsearch.export.calibration import builtin_calibration_set, load_calibration

    config = config or StaticConfig()
    try:
        data = builtin_calibration_set() if calibration is None else load_calibration(calibration)
    except (OSError, ValueError) as exc:
        from clipsearch.export.exporter import ExportError

        raise ExportError(f"cannot read the calibration set: {exc}") from exc
    text_fp32, vision_fp32 = (out_dir / f for f in files_fp32)
    text_out, vision_out = (out_dir / f for f in files_int8)
    pad_to = 0 if config.method == "minmax" else text_spec.context_length
    texts = text_feeds(tokenizer_file, text_spec, data.texts, pad_to)
    make_int8_static(text_fp32, text_out, texts, config)
    make_int8_static(vision_fp32, vision_out, vision_feeds(vision_spec, data.images), config)
    return {**config.describe(), "calibration": data.describe()}


def _activation_matmuls(model: Any) -> list[str]:
    """MatMuls whose both operands are activations (attention's Q.K^T and P.V)."""
    weights = {i.name for i in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and not ({n.input[0], n.input[1]} & (weights | constants))
    ]


def _projection_node(model: Any) -> str:
    """The MatMul that produces the graph output: the projection into the embedding space."""
    output = model.graph.output[0].name
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers[output]
    # Follow single-input reshapes/casts back to the MatMul.
    while node.op_type != "MatMul" and node.input and node.input[0] in producers:
        node = producers[node.input[0]]
    if node.op_type != "MatMul":
        raise ValueError(f"no projection MatMul feeds the output {output}")
    name: str = node.name
    return name
