"""What every model family gives the exporter: two towers, their specs, the reference side.

An adapter per family (clip, chinese_clip, siglip, multilingual, openclip) loads a checkpoint
into a `FamilyModel`; `clipsearch.export.exporter` is generic over it. The reference side
(`tokenize`, `preprocess`, the towers in PyTorch) is what a user of that family computes with
its own tokenizer and image processor; the exporter compares the server's preprocessing and
the ONNX graphs against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clipsearch.server.bundle import TextSpec, VisionSpec

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

Tokenize = Callable[[Sequence[str]], dict[str, Any]]  # texts -> padded torch int64 tensors
Preprocess = Callable[[Sequence[Any]], Any]  # PIL images -> float32 torch [n, 3, S, S]


class ExportError(Exception):
    """The checkpoint cannot be exported as asked; the message says why, for a person."""


@dataclass(frozen=True)
class FamilyModel:
    family: str
    # forward(*inputs, in text_spec.inputs order) -> unnormalized [batch, dim]
    text_tower: Any
    # forward(pixel_values) -> unnormalized [batch, dim]
    vision_tower: Any
    text_spec: TextSpec
    vision_spec: VisionSpec
    tokenizer_json: str  # a `tokenizers` graph without padding or truncation
    tokenize: Tokenize
    preprocess: Preprocess
    sources: dict[str, str] = field(default_factory=dict)
    # What the family's users run on `tokenize`'s output, where the exported text tower is a
    # cut of it (OpenCLIP: encode_text on 77-token rows); None: text_tower itself.
    text_reference: Any = None
    # Export the text tower with torch.export (dynamo) instead of the TorchScript trace, which
    # fixes nn.MultiheadAttention's sequence length (OpenCLIP) at the example's.
    text_export_dynamo: bool = False


class Tower:
    """A torch module calling `fn(model, **inputs)`: one ONNX graph per tower."""

    @staticmethod
    def make(model: Any, names: Sequence[str], fn: Callable[..., Any]) -> Any:
        import torch

        class _Tower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                self.names = tuple(names)

            def forward(self, *inputs: torch.Tensor) -> Any:
                return features(fn(self.model, **dict(zip(self.names, inputs, strict=True))))

        tower = _Tower()
        tower.eval()
        return tower


def features(output: Any) -> Any:
    """The projected embedding from get_text_features / get_image_features."""
    import torch

    # transformers >= 5 returns a ModelOutput whose pooler_output is the projection.
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def hf_tokenize(
    tokenizer: Any, context: int, names: Sequence[str], padding: str = "longest"
) -> Tokenize:
    """The family's own tokenization, as its users call it: padded, truncated at `context`."""

    def tokenize(texts: Sequence[str]) -> dict[str, Any]:
        encoded = tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=context,
            return_tensors="pt",
        )
        return {name: encoded[name] for name in names}

    return tokenize


def hf_preprocess(processor: Any) -> Preprocess:
    def preprocess(images: Sequence[Any]) -> Any:
        return processor(list(images), return_tensors="pt")["pixel_values"]

    return preprocess


def backend_json(hf_tokenizer: Any) -> str:
    """The `tokenizers` graph behind a transformers tokenizer, without padding/truncation."""
    from tokenizers import Tokenizer

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"the tokenizer {type(hf_tokenizer).__name__} has no `tokenizers` backend to "
            "save as tokenizer.json"
        )
    graph = Tokenizer.from_str(backend.to_str())
    graph.no_padding()
    graph.no_truncation()
    return str(graph.to_str())


def context_length(max_positions: int, tokenizer: Any) -> int:
    """The model's positions, or the tokenizer's model_max_length where that is smaller."""
    context = int(max_positions)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 2 <= tokenizer_max < context:
        context = tokenizer_max
    return context


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int | None]:
    """(start, end, pad) ids by tokenizer kind: BOS/EOS (CLIP's BPE) or CLS/SEP (WordPiece)."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if bos is None and eos is None:
        bos = getattr(tokenizer, "cls_token_id", None)
        eos = getattr(tokenizer, "sep_token_id", None)
    pad = tokenizer.pad_token_id
    return bos, eos, eos if pad is None else pad


def check_wrapping(tokenizer: Any, bos: int | None, eos: int) -> None:
    sample = tokenizer("a")["input_ids"]
    if (bos is not None and sample[0] != bos) or sample[-1] != eos:
        want = ("START ... " if bos is not None else "") + "END"
        raise ExportError(
            f"the tokenizer does not wrap texts as {want} with ids {bos}, {eos} (got {sample})"
        )


def vision_spec_from_processor(processor: Any, model_image_size: int) -> VisionSpec:
    """The image rule of a transformers image processor (CLIP, Chinese-CLIP, SigLIP kinds).

    Shortest-edge resize + square centre crop (CLIP), or a straight resize to a square
    (Chinese-CLIP's checkpoints, SigLIP); rescale and normalize always.
    """
    p = processor
    do_crop = bool(getattr(p, "do_center_crop", False))
    steps = {"do_resize": p.do_resize, "do_rescale": p.do_rescale, "do_normalize": p.do_normalize}
    off = [name for name, on in steps.items() if not on]
    if off or getattr(p, "do_convert_rgb", None) is False:
        raise ExportError(f"image processor settings not supported: {off or 'do_convert_rgb'}")
    shortest = _size_field(p.size, "shortest_edge")
    height, width = _size_field(p.size, "height"), _size_field(p.size, "width")
    crop_h = _size_field(p.crop_size, "height") if do_crop else None
    crop_w = _size_field(p.crop_size, "width") if do_crop else None
    if shortest and crop_h and crop_h == crop_w:
        size, resize, crop, edge = crop_h, "shortest_edge", "center", shortest
    elif height and height == width and (not do_crop or (crop_h, crop_w) == (height, width)):
        size, resize, crop, edge = height, "squash", "none", height
    else:
        raise ExportError(
            f"image processor size {p.size} / crop {p.crop_size if do_crop else None} not "
            "supported: need a shortest_edge resize and a square centre crop, or a resize "
            "to a square"
        )
    if size != model_image_size:
        raise ExportError(f"image size {size} differs from the vision tower's {model_image_size}")
    resample = _RESAMPLE_NAMES.get(int(p.resample))
    if resample is None:
        raise ExportError(f"image resample {p.resample} not supported")
    return VisionSpec(
        image_size=int(size),
        resize_shortest_edge=int(edge),
        mean=three(p.image_mean),
        std=three(p.image_std),
        resample=resample,
        crop=crop,
        rescale_factor=float(p.rescale_factor),
        resize=resize,
    )


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def three(values: Any) -> tuple[float, float, float]:
    items = [float(v) for v in (values if isinstance(values, list | tuple) else [values] * 3)]
    if len(items) != 3:
        raise ExportError(f"expected 3 channel values, got {values}")
    return items[0], items[1], items[2]


def hf_kwargs(revision: str) -> dict[str, Any]:
    return {"revision": revision} if revision else {}
