"""OpenCLIP checkpoints from a local directory (laion/CLIP-ViT-B-32-laion2B-s34B-b79K layout).

The directory holds `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) and
`open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`). The standard OpenCLIP ViT
(the architecture of OpenAI's CLIP: pre-LN ViT with a class token, causal text transformer
pooled at the end token, linear projections without bias) maps one to one onto transformers'
`CLIPModel`, so the weights are converted into one and exported like any CLIP; anything else
(timm or Hugging Face towers, layer scale, attentional pooling, custom attention blocks, other
tokenizers) is refused with the keys that differ.

Reading the checkpoint needs no `open_clip` package (it imports torchvision, whose PyPI wheels
are built for the CUDA torch). The tokenizer is OpenAI's BPE (the vendored vocabulary,
export/assets), which is OpenCLIP's `SimpleTokenizer`; the image rule is OpenCLIP's eval
transform (torchvision): shortest-edge resize (bicubic unless configured) and a centre crop
rounding its offsets, or a squash; resized in the image's own mode, converted to RGB last.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.export.families import clip
from clipsearch.export.families.base import (
    ExportError,
    FamilyModel,
    Tower,
    backend_json,
    hf_tokenize,
    three,
)
from clipsearch.server.bundle import VisionSpec

FAMILY = "openclip"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys whose value must be OpenCLIP's default for the ViT to be CLIPModel's architecture.
_VISION_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pool_type": "tok",
    "final_ln_after_pool": False,
    "output_tokens": False,
    "timm_model_name": None,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "pos_embed_type": "learnable",
}
_VISION_SHAPE = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_VISION_TRAINING = {"patch_dropout", "emb_dropout"}  # no effect at inference
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "output_tokens": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "hf_model_name": None,
}
_TEXT_SHAPE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_IGNORED = {"eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}
_MODEL_IGNORED = {"init_logit_scale", "init_logit_bias", "cast_dtype"}


def load(directory: str | Path) -> FamilyModel:
    from clipsearch.export.tokenizers import CONTEXT_LENGTH, VOCAB_SIZE, clip_tokenizer

    root = Path(directory)
    raw = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    model_cfg: dict[str, Any] = raw.get("model_cfg", raw)
    preprocess_cfg: dict[str, Any] = raw.get("preprocess_cfg", {})
    _check_supported(model_cfg)
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    vocab = int(text_cfg.get("vocab_size", VOCAB_SIZE))
    context = int(text_cfg.get("context_length", CONTEXT_LENGTH))
    if vocab != VOCAB_SIZE or context != CONTEXT_LENGTH:
        raise ExportError(
            f"OpenCLIP text vocab {vocab} / context {context}: only OpenAI's BPE "
            f"({VOCAB_SIZE} tokens, context {CONTEXT_LENGTH}) is supported"
        )
    model = to_clip_model(model_cfg, load_state_dict(root))
    with tempfile.TemporaryDirectory(prefix="clipsearch-openclip-") as scratch:
        tokenizer = clip_tokenizer(scratch)
    spec = clip.text_spec(model, tokenizer)
    vision = vision_spec(preprocess_cfg, int(vision_cfg.get("image_size", 224)))
    return FamilyModel(
        family=FAMILY,
        text_tower=Tower.make(
            model, spec.inputs, lambda m, input_ids: m.get_text_features(input_ids=input_ids)
        ),
        vision_tower=Tower.make(
            model,
            ("pixel_values",),
            lambda m, pixel_values: m.get_image_features(pixel_values=pixel_values),
        ),
        text_spec=spec,
        vision_spec=vision,
        tokenizer_json=backend_json(tokenizer),
        tokenize=hf_tokenize(tokenizer, spec.context_length, spec.inputs),
        preprocess=lambda images: _stack(eval_transform(vision, images)),
    )


def _check_supported(model_cfg: dict[str, Any]) -> None:
    problems = [f"model_cfg.{k}" for k in model_cfg if k not in _MODEL_KEYS | _MODEL_IGNORED]
    if model_cfg.get("custom_text") not in (None, False):
        problems.append("model_cfg.custom_text")
    for name, cfg, defaults, shape, ignored in (
        (
            "vision_cfg",
            model_cfg.get("vision_cfg", {}),
            _VISION_DEFAULTS,
            _VISION_SHAPE,
            _VISION_TRAINING,
        ),
        ("text_cfg", model_cfg.get("text_cfg", {}), _TEXT_DEFAULTS, _TEXT_SHAPE, _TEXT_IGNORED),
    ):
        for key, value in cfg.items():
            if key in shape or key in ignored:
                continue
            if key not in defaults or value not in (defaults[key], {}):
                problems.append(f"{name}.{key}={value!r}")
    if not isinstance(model_cfg.get("vision_cfg", {}).get("image_size", 224), int):
        problems.append("vision_cfg.image_size (not square)")
    if problems:
        raise ExportError(
            "this OpenCLIP model is not the standard ViT + text transformer that clipsearch "
            f"converts (differs in: {', '.join(problems)}); supported: OpenCLIP ViT models "
            "such as ViT-B-32 (laion/CLIP-ViT-B-32-laion2B-s34B-b79K); for SigLIP export the "
            "transformers SiglipModel checkpoint instead"
        )


def load_state_dict(root: Path) -> dict[str, Any]:
    import torch

    for name in WEIGHT_FILES:
        path = root / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return dict(load_file(str(path)))
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
            return dict(state.get("state_dict", state))
    raise ExportError(f"no OpenCLIP weights in {root} (looked for {', '.join(WEIGHT_FILES)})")


def to_clip_model(model_cfg: dict[str, Any], state: dict[str, Any]) -> Any:
    """transformers' CLIPModel holding the OpenCLIP weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clipsearch.export.tokenizers import BOS_ID, CONTEXT_LENGTH, EOS_ID, VOCAB_SIZE

    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    embed_dim = int(model_cfg["embed_dim"])
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    v_width = int(vision_cfg.get("width", 768))
    t_width = int(text_cfg.get("width", 512))
    config = CLIPConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": t_width,
            "intermediate_size": int(t_width * float(text_cfg.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(text_cfg.get("layers", 12)),
            "num_attention_heads": int(text_cfg.get("heads", 8)),
            "max_position_embeddings": CONTEXT_LENGTH,
            "hidden_act": act,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
            "projection_dim": embed_dim,
        },
        vision_config={
            "hidden_size": v_width,
            "intermediate_size": int(v_width * float(vision_cfg.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(vision_cfg.get("layers", 12)),
            "num_attention_heads": v_width // int(vision_cfg.get("head_width", 64)),
            "image_size": int(vision_cfg.get("image_size", 224)),
            "patch_size": int(vision_cfg.get("patch_size", 32)),
            "hidden_act": act,
            "projection_dim": embed_dim,
        },
        projection_dim=embed_dim,
    )
    model: Any = CLIPModel(config)
    model.set_attn_implementation("eager")
    converted = convert_state_dict(state)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:
        raise ExportError(f"the OpenCLIP weights do not fit their config: {exc}") from exc
    missing = [k for k in missing if not k.endswith("position_ids") and k != "logit_scale"]
    if missing or unexpected:
        raise ExportError(
            f"the OpenCLIP weights do not map onto CLIP: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.eval()
    with torch.no_grad():
        model.logit_scale.copy_(state.get("logit_scale", model.logit_scale))
    return model


def convert_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """OpenCLIP (OpenAI CLIP layout) parameter names and shapes -> transformers' CLIPModel."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in ("attn_mask", "logit_bias", "logit_scale") or key.endswith(".attn_mask"):
            continue
        if key.startswith("visual."):
            out.update(_convert(key.removeprefix("visual."), value, vision=True))
        else:
            out.update(_convert(key, value, vision=False))
    return out


def _convert(key: str, value: Any, *, vision: bool) -> dict[str, Any]:
    tower = "vision_model" if vision else "text_model"
    direct = {
        "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "class_embedding": "vision_model.embeddings.class_embedding",
        "positional_embedding": f"{tower}.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "ln_post.weight": "vision_model.post_layernorm.weight",
        "ln_post.bias": "vision_model.post_layernorm.bias",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    if key in direct:
        return {direct[key]: value}
    if key == "proj":
        return {"visual_projection.weight": value.T.contiguous()}
    if key == "text_projection":
        return {"text_projection.weight": value.T.contiguous()}
    if key.startswith("transformer.resblocks."):
        index, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
        layer = f"{tower}.encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[-1]
            q, k, v = value.chunk(3, dim=0)
            return {
                f"{layer}self_attn.{name}_proj.{kind}": part.contiguous()
                for name, part in (("q", q), ("k", k), ("v", v))
            }
        renames = {
            "attn.out_proj.": "self_attn.out_proj.",
            "ln_1.": "layer_norm1.",
            "ln_2.": "layer_norm2.",
            "mlp.c_fc.": "mlp.fc1.",
            "mlp.c_proj.": "mlp.fc2.",
        }
        for old, new in renames.items():
            if rest.startswith(old):
                return {layer + new + rest.removeprefix(old): value}
    raise ExportError(f"unexpected OpenCLIP parameter {'visual.' if vision else ''}{key}")


def vision_spec(preprocess_cfg: dict[str, Any], image_size: int) -> VisionSpec:
    size = preprocess_cfg.get("size", image_size)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ExportError(f"OpenCLIP preprocess size {size} is not square")
        size = size[0]
    if int(size) != image_size:
        raise ExportError(f"OpenCLIP preprocess size {size} differs from the tower's {image_size}")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash") or interpolation not in ("bicubic", "bilinear"):
        raise ExportError(
            f"OpenCLIP preprocessing resize_mode={resize_mode!r} interpolation="
            f"{interpolation!r} not supported (shortest or squash; bicubic or bilinear)"
        )
    squash = resize_mode == "squash"
    return VisionSpec(
        image_size=image_size,
        resize_shortest_edge=image_size,
        mean=three(preprocess_cfg.get("mean", OPENAI_MEAN)),
        std=three(preprocess_cfg.get("std", OPENAI_STD)),
        resample=interpolation,
        crop="none" if squash else "center_round",
        resize="squash" if squash else "shortest_edge",
        convert_rgb="last",
    )


def eval_transform(spec: VisionSpec, images: Sequence[Any]) -> list[np.ndarray]:
    """OpenCLIP's eval transform, op for op as torchvision runs it on PIL images.

    Resize(size) (shortest edge; int(size * long / short), skipped when already there) or
    Resize((size, size)); CenterCrop (offsets round((side - size) / 2), half to even);
    convert("RGB"); ToTensor (uint8 / 255 in float32); Normalize (float32).
    """
    from PIL import Image

    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    size = spec.image_size
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = []
    for original in images:
        image = original
        if spec.resize == "squash":
            image = image.resize((size, size), resample[spec.resample])
        else:
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            if short != size:
                new_long = int(size * long / short)
                new = (size, new_long) if width <= height else (new_long, size)
                image = image.resize(new, resample[spec.resample])
            width, height = image.size
            left = round((width - size) / 2.0)
            top = round((height - size) / 2.0)
            image = image.crop((left, top, left + size, top + size))
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
        out.append((pixels - mean) / std)
    return out


def _stack(arrays: list[np.ndarray]) -> Any:
    import torch

    return torch.from_numpy(np.stack(arrays))
