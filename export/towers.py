"""A family's text and vision towers as two ONNX graphs (torch.onnx.export, TorchScript path).

The towers come from the family adapters (`clipsearch.export.families`): each wraps the
model's own feature function (`get_text_features` / `get_image_features`, or what the
family's forward computes), so the graphs compute what PyTorch computes, pooling included.
Projections are left unnormalized: the server L2-normalizes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TEXT_OUTPUT = "text_embeds"
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"


def export_text_tower(
    tower: Any,
    path: Path,
    opset: int,
    examples: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    max_sequence: int | None = None,
) -> Path:
    """int64 inputs `names`, each [batch, sequence] -> text_embeds float32 [batch, dim].

    With `max_sequence`, through torch.export (dynamo), sequence lengths 2..max_sequence.
    """
    inputs = tuple(t.to(torch.int64) for t in examples)
    if max_sequence is not None:
        _export_dynamo(tower, inputs, path, opset, names=names, max_sequence=max_sequence)
        return path
    _export(
        tower,
        inputs,
        path,
        opset,
        input_axes={name: {0: "batch", 1: "sequence"} for name in names},
        output_name=TEXT_OUTPUT,
    )
    return path


def _export_dynamo(
    module: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    *,
    names: Sequence[str],
    max_sequence: int,
) -> None:
    module.eval()
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", min=2, max=max_sequence)
    # Both announce, as warnings, the conversion to `opset`, which is what is asked.
    loggers = [
        logging.getLogger(name)
        for name in ("onnxscript.version_converter", "torch.onnx._internal.exporter._compat")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                examples,
                input_names=list(names),
                output_names=[TEXT_OUTPUT],
                dynamic_shapes=tuple({0: batch, 1: sequence} for _ in names),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            assert program is not None
            program.save(str(path))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_vision_tower(tower: Any, path: Path, opset: int, image_size: int) -> Path:
    """pixel_values float32 [batch, 3, S, S] -> image_embeds float32 [batch, dim]."""
    example = torch.zeros(2, 3, image_size, image_size)
    _export(
        tower,
        (example,),
        path,
        opset,
        input_axes={VISION_INPUT: {0: "batch"}},
        output_name=VISION_OUTPUT,
    )
    return path


def _export(
    module: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    *,
    input_axes: dict[str, dict[int, str]],
    output_name: str,
) -> None:
    module.eval()
    # nn.MultiheadAttention's inference fast path (OpenCLIP's towers) is one fused op that
    # has no ONNX form; the plain path computes the same.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript tracing warns about every Python branch on shapes in transformers,
            # and torch about the TorchScript exporter itself; the parity step checks the graphs.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                examples,
                str(path),
                input_names=list(input_axes),
                output_names=[output_name],
                dynamic_axes={**input_axes, output_name: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
