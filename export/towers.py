"""CLIP's text and vision towers as two ONNX graphs (torch.onnx.export, TorchScript path).

Each tower wraps transformers' own `get_text_features` / `get_image_features`, so the graphs
compute what PyTorch computes, pooling included. In transformers 5 the text tower pools the
final-layer state at the first EOS id (`(input_ids == eos_token_id).int().argmax(-1)`), or at
the largest id for legacy configs with eos_token_id == 2 (OpenAI's own checkpoints); its
attention is causal, so padding after EOS cannot change the pooled state and the graph needs
no attention mask. Projections are left unnormalized: the server L2-normalizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

TEXT_INPUT = "input_ids"
TEXT_OUTPUT = "text_embeds"
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"


class TextTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return features(self.model.get_text_features(input_ids=input_ids))


class VisionTower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return features(self.model.get_image_features(pixel_values=pixel_values))


def features(output: Any) -> torch.Tensor:
    """The projected embedding from get_text_features / get_image_features."""
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projection.
    if isinstance(output, torch.Tensor):
        return output
    pooled: torch.Tensor = output.pooler_output
    return pooled


def export_text_tower(model: Any, path: Path, opset: int, example_ids: torch.Tensor) -> Path:
    """input_ids int64 [batch, sequence] -> text_embeds float32 [batch, dim]."""
    _export(
        TextTower(model),
        example_ids,
        path,
        opset,
        input_name=TEXT_INPUT,
        output_name=TEXT_OUTPUT,
        input_axes={0: "batch", 1: "sequence"},
    )
    return path


def export_vision_tower(model: Any, path: Path, opset: int, image_size: int) -> Path:
    """pixel_values float32 [batch, 3, S, S] -> image_embeds float32 [batch, dim]."""
    example = torch.zeros(2, 3, image_size, image_size)
    _export(
        VisionTower(model),
        example,
        path,
        opset,
        input_name=VISION_INPUT,
        output_name=VISION_OUTPUT,
        input_axes={0: "batch"},
    )
    return path


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    *,
    input_name: str,
    output_name: str,
    input_axes: dict[int, str],
) -> None:
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript tracing warns about every Python branch on shapes in transformers, and
        # torch about the TorchScript exporter itself; the parity step checks the graphs.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: input_axes, output_name: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
