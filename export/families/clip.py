"""CLIP (`CLIPModel`, model_type "clip"): openai/clip-vit-base-patch32 is the reference.

Text: input_ids only. The tower pools the final state at the first EOS id (or at the largest
id for legacy configs with eos_token_id == 2, OpenAI's own checkpoints); attention is
causal, so padding after EOS cannot change the pooled state. The tokenizer is CLIP's
byte-level BPE (BOS ... EOS) or, for some community checkpoints, a BERT-style WordPiece
([CLS] ... [SEP]); both work, by kind. Images: CLIPImageProcessor's rule (shortest edge,
bicubic, centre crop, OpenAI mean/std).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.export.families.base import (
    ExportError,
    FamilyModel,
    Tower,
    backend_json,
    check_wrapping,
    context_length,
    hf_kwargs,
    hf_preprocess,
    hf_tokenize,
    special_ids,
    vision_spec_from_processor,
)
from clipsearch.server.bundle import TextSpec, VisionSpec

FAMILY = "clip"


@dataclass(frozen=True)
class VisionPart:
    """A CLIP vision tower with its image rule: also the vision half of a multilingual pair."""

    tower: Any
    spec: VisionSpec
    preprocess: Any
    dim: int


def load(checkpoint: str | Path, revision: str = "") -> FamilyModel:
    model, tokenizer = load_model(checkpoint, revision), load_tokenizer(checkpoint, revision)
    return from_model(model, tokenizer, vision_part(model, load_processor(checkpoint, revision)))


def from_model(model: Any, tokenizer: Any, vision: VisionPart, family: str = FAMILY) -> FamilyModel:
    spec = text_spec(model, tokenizer)
    return FamilyModel(
        family=family,
        text_tower=Tower.make(
            model, spec.inputs, lambda m, input_ids: m.get_text_features(input_ids=input_ids)
        ),
        vision_tower=vision.tower,
        text_spec=spec,
        vision_spec=vision.spec,
        tokenizer_json=backend_json(tokenizer),
        tokenize=hf_tokenize(tokenizer, spec.context_length, spec.inputs),
        preprocess=vision.preprocess,
    )


def load_model(checkpoint: str | Path, revision: str = "") -> Any:
    import torch
    from transformers import CLIPModel

    try:
        model: Any = CLIPModel.from_pretrained(
            str(checkpoint),
            dtype=torch.float32,
            attn_implementation="eager",
            **hf_kwargs(revision),
        )
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load checkpoint {checkpoint}: {exc}") from exc
    model.eval()
    return model


def load_tokenizer(checkpoint: str | Path, revision: str = "") -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint), **hf_kwargs(revision))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the tokenizer of {checkpoint}: {exc}") from exc


def load_processor(checkpoint: str | Path, revision: str = "") -> Any:
    # The PIL backend is transformers' reference CLIPImageProcessor (the default class needs
    # torchvision in transformers 5); the server reproduces it exactly.
    from transformers import CLIPImageProcessorPil

    try:
        return CLIPImageProcessorPil.from_pretrained(str(checkpoint), **hf_kwargs(revision))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the image processor of {checkpoint}: {exc}") from exc


def vision_part(model: Any, processor: Any) -> VisionPart:
    spec = vision_spec_from_processor(processor, int(model.config.vision_config.image_size))
    tower = Tower.make(
        model,
        spec.inputs,
        lambda m, pixel_values: m.get_image_features(pixel_values=pixel_values),
    )
    return VisionPart(
        tower=tower,
        spec=spec,
        preprocess=hf_preprocess(processor),
        dim=int(model.config.projection_dim),
    )


def text_spec(model: Any, tokenizer: Any) -> TextSpec:
    context = context_length(model.config.text_config.max_position_embeddings, tokenizer)
    bos, eos, pad = special_ids(tokenizer)
    if eos is None or pad is None:
        raise ExportError(
            f"the tokenizer {type(tokenizer).__name__} has no end token (neither EOS nor "
            "SEP): CLIP's text tower pools at the end token"
        )
    check_wrapping(tokenizer, bos, eos)
    # The text tower pools at EOS; a config whose eos_token_id disagrees with the tokenizer
    # silently pools position 0 (argmax of all-false) and every text embeds alike.
    pooling_eos = model.text_model.eos_token_id
    if pooling_eos == 2:
        top_id = max(tokenizer.get_vocab().values())
        if eos != top_id:
            raise ExportError(
                "text_config.eos_token_id is 2 (legacy: pool at the largest id), but the "
                f"tokenizer's EOS {eos} is not its largest id {top_id}; set "
                f"text_config.eos_token_id={eos}"
            )
    elif pooling_eos != eos:
        raise ExportError(
            f"text_config.eos_token_id is {pooling_eos} but the tokenizer's EOS is {eos}: the "
            f"tower would pool the wrong position; set text_config.eos_token_id={eos}"
        )
    return TextSpec(context_length=context, bos_id=bos, eos_id=eos, pad_id=pad)
