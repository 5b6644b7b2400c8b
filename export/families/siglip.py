"""SigLIP (`SiglipModel`): google/siglip-base-patch16-224 is the reference.

Text: input_ids only, no start token, the end token `</s>`, padded to the full context
(max_length 64): the tower pools the last position, so it only means what it was trained to
mean on fixed-length text. The tokenizer is a SentencePiece Unigram model behind
transformers' SiglipTokenizer, which canonicalizes text first (lowercase, ASCII punctuation
removed, whitespace runs collapsed, stripped); tokenizer.json carries that canonicalization
as normalizers in front of the SentencePiece ones. Images: resized straight to the square,
no crop, mean/std 0.5.
"""

from __future__ import annotations

import re
import string
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
    vision_spec_from_processor,
)
from clipsearch.server.bundle import TextSpec

FAMILY = "siglip"
TEXT_INPUTS = ("input_ids",)


def load(checkpoint: str | Path, revision: str = "") -> FamilyModel:
    import torch
    from transformers import AutoTokenizer, SiglipImageProcessorPil, SiglipModel

    kwargs = hf_kwargs(revision)
    try:
        model: Any = SiglipModel.from_pretrained(
            str(checkpoint), dtype=torch.float32, attn_implementation="eager", **kwargs
        )
        processor = SiglipImageProcessorPil.from_pretrained(str(checkpoint), **kwargs)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load checkpoint {checkpoint}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ExportError(
            f"cannot load the SigLIP tokenizer of {checkpoint} (SiglipTokenizer needs the "
            f"sentencepiece package: pip install sentencepiece): {exc}"
        ) from exc
    model.eval()
    context = context_length(model.config.text_config.max_position_embeddings, tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ExportError("the SigLIP tokenizer has no end token")
    pad = eos if pad is None else pad
    check_wrapping(tokenizer, None, eos)
    spec = TextSpec(
        context_length=context, bos_id=None, eos_id=eos, pad_id=pad, padding="max_length"
    )
    vision_spec = vision_spec_from_processor(processor, int(model.config.vision_config.image_size))
    return FamilyModel(
        family=FAMILY,
        text_tower=Tower.make(
            model, TEXT_INPUTS, lambda m, input_ids: m.get_text_features(input_ids=input_ids)
        ),
        vision_tower=Tower.make(
            model,
            ("pixel_values",),
            lambda m, pixel_values: m.get_image_features(pixel_values=pixel_values),
        ),
        text_spec=spec,
        vision_spec=vision_spec,
        tokenizer_json=tokenizer_json(tokenizer),
        tokenize=hf_tokenize(tokenizer, context, TEXT_INPUTS, padding="max_length"),
        preprocess=hf_preprocess(processor),
    )


def tokenizer_json(tokenizer: Any) -> str:
    """SiglipTokenizer (SentencePiece, Python) as a `tokenizers` graph with its canonicalization."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return backend_json(tokenizer)
    from tokenizers import Regex, Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import SpmConverter

    graph: Any = SpmConverter(tokenizer).converted()  # type: ignore[no-untyped-call]
    canonical: list[Any] = [normalizers.Lowercase()] if tokenizer.do_lower_case else []
    canonical += [
        normalizers.Replace(Regex("[" + re.escape(string.punctuation) + "]"), ""),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ]
    if graph.normalizer is not None:
        canonical.append(graph.normalizer)
    graph.normalizer = normalizers.Sequence(canonical)
    graph.post_processor = None
    result = Tokenizer.from_str(graph.to_str())
    result.no_padding()
    result.no_truncation()
    return str(result.to_str())
