"""Chinese-CLIP (`ChineseCLIPModel`): OFA-Sys/chinese-clip-vit-base-patch16, -large-patch14.

Text: a BERT (input_ids, attention_mask, token_type_ids) with a WordPiece vocabulary in which
every Chinese character is a token; the embedding is what `forward()` computes,
`text_projection(last_hidden_state[:, 0])` ([CLS]). Images: its image processor's rule; the
OFA-Sys checkpoints resize straight to height x width (no centre crop).
"""

from __future__ import annotations

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
from clipsearch.server.bundle import TextSpec

FAMILY = "chinese-clip"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load(checkpoint: str | Path, revision: str = "") -> FamilyModel:
    import torch
    from transformers import AutoTokenizer, ChineseCLIPImageProcessorPil, ChineseCLIPModel

    kwargs = hf_kwargs(revision)
    try:
        model: Any = ChineseCLIPModel.from_pretrained(
            str(checkpoint), dtype=torch.float32, attn_implementation="eager", **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), **kwargs)
        processor = ChineseCLIPImageProcessorPil.from_pretrained(str(checkpoint), **kwargs)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load checkpoint {checkpoint}: {exc}") from exc
    model.eval()
    context = context_length(model.config.text_config.max_position_embeddings, tokenizer)
    bos, eos, pad = special_ids(tokenizer)
    if bos is None or eos is None or pad is None:
        raise ExportError("the Chinese-CLIP tokenizer has no [CLS]/[SEP]/[PAD] tokens")
    check_wrapping(tokenizer, bos, eos)
    spec = TextSpec(context_length=context, bos_id=bos, eos_id=eos, pad_id=pad, inputs=TEXT_INPUTS)

    def text(m: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        state = m.text_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return m.text_projection(state[:, 0, :])

    vision_spec = vision_spec_from_processor(processor, int(model.config.vision_config.image_size))
    return FamilyModel(
        family=FAMILY,
        text_tower=Tower.make(model, TEXT_INPUTS, text),
        vision_tower=Tower.make(
            model, ("pixel_values",), lambda m, pixel_values: m.get_image_features(pixel_values)
        ),
        text_spec=spec,
        vision_spec=vision_spec,
        tokenizer_json=backend_json(tokenizer),
        tokenize=hf_tokenize(tokenizer, context, TEXT_INPUTS),
        preprocess=hf_preprocess(processor),
    )
