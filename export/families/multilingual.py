"""A multilingual text tower distilled into CLIP space, paired with a CLIP vision tower.

The reference pair is sentence-transformers/clip-ViT-B-32-multilingual-v1 (text) with
openai/clip-vit-base-patch32 (vision), the setup of the Elasticsearch article: the text model
is a sentence-transformers directory whose modules are Transformer (DistilBERT, multilingual
WordPiece) -> Pooling (mean over the attention mask) -> Dense (768 -> 512, no bias, identity
activation), trained so its output lands where CLIP's text tower would put the English text.
The text tower here is exactly that pipeline; the vision tower and the image rule come from
the CLIP checkpoint. Read without the sentence-transformers package: modules.json,
sentence_bert_config.json, 1_Pooling/config.json and 2_Dense/{config.json, weights}.

    clipsearch export --text TEXT_CKPT --vision CLIP_CKPT --out DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipsearch.export.families import clip
from clipsearch.export.families.base import (
    ExportError,
    FamilyModel,
    Tower,
    backend_json,
    check_wrapping,
    context_length,
    hf_kwargs,
    special_ids,
)
from clipsearch.server.bundle import TextSpec

FAMILY = "multilingual-clip"
_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh")
_POOLING_MODES = (
    "pooling_mode_cls_token",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def load(text: str | Path, vision: str | Path, revision: str = "") -> FamilyModel:
    vision_model = clip.load_model(vision, revision)
    vision_part = clip.vision_part(vision_model, clip.load_processor(vision, revision))
    root = _local_dir(text, revision)
    modules = _modules(root)
    transformer_dir = root / modules[0].get("path", "")
    encoder, tokenizer, max_length, lowercase = _transformer(transformer_dir)
    _check_pooling(root / modules[1]["path"])
    dense, out_dim = None, int(encoder.config.hidden_size)
    if len(modules) > 2:
        dense, out_dim = _dense(root / modules[2]["path"])
    if out_dim != vision_part.dim:
        raise ExportError(
            f"the text model {text} embeds into {out_dim} dimensions but the vision tower of "
            f"{vision} into {vision_part.dim}: pair it with the CLIP checkpoint it was "
            "distilled into"
        )

    bos, eos, pad = special_ids(tokenizer)
    if bos is None or eos is None or pad is None:
        raise ExportError("the text model's tokenizer has no [CLS]/[SEP]/[PAD] tokens")
    check_wrapping(tokenizer, bos, eos)
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and _takes_token_types(encoder):
        names.append("token_type_ids")
    inputs = tuple(names)
    context = context_length(min(max_length, _max_positions(encoder)), tokenizer)
    spec = TextSpec(context_length=context, bos_id=bos, eos_id=eos, pad_id=pad, inputs=inputs)

    def text_tower(model: Any, **feeds: Any) -> Any:
        state = model.encoder(**feeds).last_hidden_state
        mask = feeds["attention_mask"].unsqueeze(-1).to(state.dtype)
        pooled = (state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return pooled if model.dense is None else model.dense(pooled)

    def tokenize(texts: Any) -> dict[str, Any]:
        # sentence-transformers strips every text (and lowercases when configured) first.
        cleaned = [t.strip().lower() if lowercase else t.strip() for t in texts]
        encoded = tokenizer(
            cleaned, padding=True, truncation=True, max_length=context, return_tensors="pt"
        )
        return {name: encoded[name] for name in inputs}

    return FamilyModel(
        family=FAMILY,
        text_tower=Tower.make(_TextModel.make(encoder, dense), inputs, text_tower),
        vision_tower=vision_part.tower,
        text_spec=spec,
        vision_spec=vision_part.spec,
        tokenizer_json=_tokenizer_json(tokenizer, lowercase),
        tokenize=tokenize,
        preprocess=vision_part.preprocess,
        sources={"text": str(text), "vision": str(vision)},
    )


class _TextModel:
    @staticmethod
    def make(encoder: Any, dense: Any) -> Any:
        import torch

        class TextModel(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = encoder
                self.dense = dense

        return TextModel().eval()


def _local_dir(text: str | Path, revision: str) -> Path:
    path = Path(str(text))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(text), **hf_kwargs(revision)))
    except Exception as exc:  # the hub client raises many kinds; all mean "not available"
        raise ExportError(f"cannot load the text model {text}: {exc}") from exc


def _modules(root: Path) -> list[dict[str, Any]]:
    try:
        modules: list[dict[str, Any]] = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"{root} is not a sentence-transformers model (modules.json: {exc}); --text takes "
            "one such as sentence-transformers/clip-ViT-B-32-multilingual-v1"
        ) from exc
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[-1:] == ["Normalize"]:  # the server L2-normalizes anyway
        kinds, modules = kinds[:-1], modules[:-1]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Dense"]):
        raise ExportError(
            f"the text model's modules are {kinds}; supported: Transformer -> Pooling (mean) "
            "-> Dense, as sentence-transformers/clip-ViT-B-32-multilingual-v1"
        )
    return modules


def _transformer(path: Path) -> tuple[Any, Any, int, bool]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    settings: dict[str, Any] = {}
    config_file = path / "sentence_bert_config.json"
    if config_file.is_file():
        settings = json.loads(config_file.read_text())
    try:
        encoder: Any = AutoModel.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the text model's transformer in {path}: {exc}") from exc
    encoder.eval()
    max_length = int(settings.get("max_seq_length") or _max_positions(encoder))
    return encoder, tokenizer, max_length, bool(settings.get("do_lower_case", False))


def _max_positions(encoder: Any) -> int:
    return int(getattr(encoder.config, "max_position_embeddings", 512))


def _takes_token_types(encoder: Any) -> bool:
    import inspect

    return "token_type_ids" in inspect.signature(encoder.forward).parameters


def _check_pooling(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    others = [mode for mode in _POOLING_MODES if config.get(mode)]
    if not config.get("pooling_mode_mean_tokens") or others:
        raise ExportError(f"the text model pools with {others or 'no mode'}; supported: mean")


def _dense(path: Path) -> tuple[Any, int]:
    import torch

    config = json.loads((path / "config.json").read_text())
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _ACTIVATIONS:
        raise ExportError(f"Dense activation {activation} not supported (only {_ACTIVATIONS})")
    bias = bool(config.get("bias", True))
    linear = torch.nn.Linear(int(config["in_features"]), int(config["out_features"]), bias=bias)
    state = _dense_weights(path)
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    except RuntimeError as exc:
        raise ExportError(f"the Dense weights in {path} do not fit its config: {exc}") from exc
    layers = [linear] + ([torch.nn.Tanh()] if activation.endswith("Tanh") else [])
    return torch.nn.Sequential(*layers).eval(), linear.out_features


def _dense_weights(path: Path) -> dict[str, Any]:
    import torch

    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return dict(load_file(str(path / "model.safetensors")))
    if (path / "pytorch_model.bin").is_file():
        weights: dict[str, Any] = torch.load(
            path / "pytorch_model.bin", map_location="cpu", weights_only=True
        )
        return weights
    raise ExportError(f"no Dense weights (model.safetensors or pytorch_model.bin) in {path}")


def _tokenizer_json(tokenizer: Any, lowercase: bool) -> str:
    graph = backend_json(tokenizer)
    if not lowercase:
        return graph
    from tokenizers import Tokenizer, normalizers

    result = Tokenizer.from_str(graph)
    steps = [normalizers.Lowercase()] + ([result.normalizer] if result.normalizer else [])
    result.normalizer = normalizers.Sequence(steps)
    return str(result.to_str())
