"""A family's text and vision towers as two ONNX graphs (torch.onnx.export, TorchScript path).

The towers come from the family adapters (`clipsearch.export.families`): each wraps the
model's own feature function (`get_text_features` / `get_image_features`, or what the
family's forward computes), so the graphs compute what PyTorch computes, pooling included.
Projections are left unnormalized: the server L2-normalizes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TEXT_OUTPUT = "text_embeds"
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"


def export_text_tower(
    tower: Any, path: Path, opset: int, examples: Sequence[torch.Tensor], names: Sequence[str]
) -> Path:
    """int64 inputs `names`, each [batch, sequence] -> text_embeds float32 [batch, dim]."""
    _export(
        tower,
        tuple(t.to(torch.int64) for t in examples),
        path,
        opset,
        input_axes={name: {0: "batch", 1: "sequence"} for name in names},
        output_name=TEXT_OUTPUT,
    )
    return path


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
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript tracing warns about every Python branch on shapes in transformers, and
        # torch about the TorchScript exporter itself; the parity step checks the graphs.
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
