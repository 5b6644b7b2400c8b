"""OpenCLIP checkpoints from a local directory (laion/CLIP-ViT-B-32-laion2B-s34B-b79K layout).

The directory holds `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) and
`open_clip_model.safetensors` (or another weight file OpenCLIP finds there). OpenCLIP itself
(`open_clip_torch`, in the [export] extra) builds the model from it
(`create_model_and_transforms("local-dir:DIR")`, no hub), and gives the reference side: its
`encode_text` / `encode_image`, its tokenizer (`get_tokenizer("local-dir:DIR")`) and its eval
image transform (torchvision). The exported graphs are `encode_image` as is and the text
tower of `encode_text` cut to the batch's length (see `_TextTower`); the parity gate compares
them with `encode_text` on OpenCLIP's own 77-token rows.

The tokenizer must be OpenCLIP's `SimpleTokenizer` (OpenAI's BPE): tokenizer.json is built
from its vocabulary and merges, with its text cleaning as a `tokenizers` normalizer (see
`tokenizer_json`). Models with a Hugging Face tokenizer or text tower are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipsearch.export.families.base import ExportError, FamilyModel, Tower, three
from clipsearch.server.bundle import TextSpec, VisionSpec

FAMILY = "openclip"
CONFIG_FILE = "open_clip_config.json"
# What `download` fetches besides the config, in order of preference (the LAION repositories
# hold both; one is enough).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HUB_PREFIX = "hf-hub:"
# OpenCLIP's SimpleTokenizer regex, case-insensitive as there ("'ſ" is "'s" to it).
SIMPLE_PATTERN = (
    r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# Pooling positions a shorter (batch-longest) padding cannot move: the end token by id, or
# the start. "last" pools the final position, so it needs the full context.
_TRIMMABLE_POOLING = ("argmax", "eos", "first")


def load(directory: str | Path) -> FamilyModel:
    try:
        import open_clip
    except ImportError as exc:
        raise ExportError(
            "OpenCLIP checkpoints need the open_clip_torch package (and torchvision): "
            "pip install 'clipsearch[export]'"
        ) from exc

    root = Path(directory).resolve()
    model_cfg = _model_cfg(root)
    _check_text_cfg(model_cfg.get("text_cfg", {}))
    name = f"local-dir:{root}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, precision="fp32", device="cpu", require_pretrained=True
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, AssertionError) as exc:
        detail = str(exc) if len(str(exc)) <= 500 else str(exc)[:500] + " ..."
        raise ExportError(f"OpenCLIP could not load {root}: {detail}") from exc
    model.eval()
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise ExportError(
            f"the OpenCLIP tokenizer of {root} is {type(tokenizer).__name__}; only OpenCLIP's "
            "SimpleTokenizer (OpenAI's BPE) is supported"
        )
    spec, text_tower = text_part(model, tokenizer)
    return FamilyModel(
        family=FAMILY,
        text_tower=text_tower,
        vision_tower=Tower.make(
            model, ("pixel_values",), lambda m, pixel_values: m.encode_image(pixel_values)
        ),
        text_spec=spec,
        vision_spec=vision_spec(model.visual.preprocess_cfg),
        tokenizer_json=tokenizer_json(tokenizer),
        tokenize=_tokenize(tokenizer, trim=spec.padding == "longest"),
        preprocess=_preprocess(preprocess),
        text_reference=Tower.make(model, ("input_ids",), _encode_text_padded),
        # The trace fixes nn.MultiheadAttention's sequence length: fine at the full context.
        text_export_dynamo=spec.padding == "longest",
    )


def download(name: str, revision: str = "") -> Path:
    """`hf-hub:ORG/REPO` (OpenCLIP's name for a hub checkpoint) into the Hugging Face cache:
    its config and one weight file (safetensors first). Returns the snapshot directory."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = name.removeprefix(HUB_PREFIX)
    try:
        config = Path(hf_hub_download(repo, CONFIG_FILE, revision=revision or None))
        for weights in WEIGHT_FILES:
            try:
                hf_hub_download(repo, weights, revision=revision or None)
                return config.parent
            except EntryNotFoundError:
                continue
    except Exception as exc:  # huggingface_hub: network, offline mode, missing repo or file
        raise ExportError(f"cannot download the OpenCLIP checkpoint {name}: {exc}") from exc
    raise ExportError(f"{name} has none of the OpenCLIP weight files {', '.join(WEIGHT_FILES)}")


def _tokenize(tokenizer: Any, *, trim: bool) -> Callable[[Sequence[str]], dict[str, Any]]:
    """OpenCLIP's tokenizer: rows of context_length ids, zeros after the end token; with
    `trim`, cut to the batch's longest row (only zeros go), as the server pads."""

    def tokenize(texts: Sequence[str]) -> dict[str, Any]:
        ids = tokenizer(list(texts))
        if trim:
            filled = (ids != 0).int()
            ends = ids.shape[1] - filled.flip(1).argmax(1)  # one past each row's last token
            ids = ids[:, : int(ends.max())]
        return {"input_ids": ids}

    return tokenize


def _encode_text_padded(model: Any, input_ids: Any) -> Any:
    """`encode_text` on the rows OpenCLIP's tokenizer gave, zeros restored to the context."""
    import torch

    width = int(model.context_length) - input_ids.shape[1]
    return model.encode_text(torch.nn.functional.pad(input_ids, (0, width)))


def _model_cfg(root: Path) -> dict[str, Any]:
    try:
        raw = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {root / CONFIG_FILE}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_cfg"), dict):
        raise ExportError(f"{root / CONFIG_FILE} has no model_cfg (OpenCLIP's hub layout)")
    model_cfg: dict[str, Any] = raw["model_cfg"]
    return model_cfg


def _check_text_cfg(text_cfg: dict[str, Any]) -> None:
    """Refuse, before building anything, what needs a hub or a tokenizer we do not convert."""
    problems = [
        f"text_cfg.{key}={text_cfg[key]!r}"
        for key in ("hf_model_name", "hf_tokenizer_name")
        if text_cfg.get(key)
    ]
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if kwargs.pop("clean", "lower") != "lower" or kwargs:
        problems.append(f"text_cfg.tokenizer_kwargs={text_cfg['tokenizer_kwargs']!r}")
    if problems:
        raise ExportError(
            "this OpenCLIP model's text side is not OpenCLIP's own text transformer with its "
            f"SimpleTokenizer (differs in: {', '.join(problems)}); supported: OpenCLIP models "
            "such as ViT-B-32 (laion/CLIP-ViT-B-32-laion2B-s34B-b79K); for SigLIP export the "
            "transformers SiglipModel checkpoint instead"
        )


def text_part(model: Any, tokenizer: Any) -> tuple[TextSpec, Any]:
    """The text spec and the tower to export: trimmed to the batch where padding is inert."""
    context = int(model.context_length)
    bos, eos = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
    pool = str(getattr(model, "text_pool_type", ""))
    if pool == "argmax" and eos != max(tokenizer.encoder.values()):
        raise ExportError(f"the text tower pools at the largest id, but the end token {eos} is not")
    causal = getattr(model, "attn_mask", None) is not None
    trimmable = hasattr(model, "positional_embedding") and causal and pool in _TRIMMABLE_POOLING
    spec = TextSpec(
        context_length=context,
        bos_id=bos,
        eos_id=eos,
        pad_id=0,  # OpenCLIP pads with zeros
        padding="longest" if trimmable else "max_length",
    )
    if not trimmable:
        return spec, Tower.make(
            model, ("input_ids",), lambda m, input_ids: m.encode_text(input_ids)
        )
    return spec, _text_tower(model)


def _text_tower(model: Any) -> Any:
    """`CLIP.encode_text` for any length up to the context.

    OpenCLIP adds all `context_length` positional embeddings and the full causal mask, so its
    input is always padded to 77; under the causal mask the positions after the pooled token
    cannot change it, so the graph slices both to the input's length instead.
    """
    import torch
    from open_clip.transformer import text_global_pool

    class _TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> Any:
            m = self.model
            n = input_ids.shape[1]
            x = m.token_embedding(input_ids) + m.positional_embedding[:n]
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
            x = text_global_pool(x, input_ids, m.text_pool_type, eos_token_id=m.text_eos_id)
            if isinstance(m.text_projection, torch.nn.Linear):
                return m.text_projection(x)
            return x if m.text_projection is None else x @ m.text_projection

    tower = _TextTower()
    tower.eval()
    return tower


def vision_spec(preprocess_cfg: dict[str, Any]) -> VisionSpec:
    """OpenCLIP's eval transform as a VisionSpec: shortest edge + centre crop (torchvision's
    rounded offsets) or a squash; resized in the image's own mode, converted to RGB last."""
    size = preprocess_cfg.get("size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ExportError(f"OpenCLIP preprocess size {size} is not square")
        size = size[0]
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash") or interpolation not in ("bicubic", "bilinear"):
        raise ExportError(
            f"OpenCLIP preprocessing resize_mode={resize_mode!r} interpolation="
            f"{interpolation!r} not supported (shortest or squash; bicubic or bilinear)"
        )
    squash = resize_mode == "squash"
    return VisionSpec(
        image_size=int(size),
        resize_shortest_edge=int(size),
        mean=three(preprocess_cfg["mean"]),
        std=three(preprocess_cfg["std"]),
        resample=interpolation,
        crop="none" if squash else "center_round",
        resize="squash" if squash else "shortest_edge",
        convert_rgb="last",
    )


def _preprocess(transform: Callable[[Any], Any]) -> Callable[[Sequence[Any]], Any]:
    def preprocess(images: Sequence[Any]) -> Any:
        import torch

        return torch.stack([transform(image) for image in images])

    return preprocess


def tokenizer_json(tokenizer: Any) -> str:
    """OpenCLIP's SimpleTokenizer as a `tokenizers` graph (no special tokens added: the server
    adds start and end from the manifest).

    Its vocabulary and merges, its regex, byte-level BPE with "</w>" word ends. Its cleaning
    (`ftfy.fix_text`, `html.unescape` twice, whitespace, lowercase) becomes the normalizer:
    ftfy's default character fixes (ligatures, full/half width, curly quotes, control
    characters), NFC, whitespace runs to one space, lowercase. Not reproduced: HTML entities
    and ftfy's mojibake repair (texts with those tokenize differently).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    ranks: dict[tuple[str, str], int] = tokenizer.bpe_ranks
    merges = sorted(ranks, key=ranks.__getitem__)
    graph = Tokenizer(
        models.BPE(
            vocab=dict(tokenizer.encoder), merges=merges, end_of_word_suffix="</w>", fuse_unk=False
        )
    )
    graph.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(ftfy_charsmap()),
            normalizers.Replace("\x00", ""),  # a charsmap key cannot be NUL
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )
    graph.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(SIMPLE_PATTERN), behavior="removed", invert=True),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    graph.decoder = decoders.ByteLevel()
    graph.add_special_tokens(
        [AddedToken(t, special=True, normalized=True) for t in ("<start_of_text>", "<end_of_text>")]
    )
    return str(graph.to_str())


def ftfy_charsmap() -> bytes:
    """ftfy.fix_text's per-character fixes, in its order, as one SentencePiece charsmap.

    fix_latin_ligatures, fix_character_width, uncurl_quotes and remove_control_chars are
    `str.translate`-like maps, so their composition per character is the whole effect; one
    charsmap applies it in a single pass (a Replace per character costs ~15x the tokenization).
    """
    from ftfy import chardata, fixes
    from sentencepiece import SentencePieceNormalizer, set_min_log_level
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    def fix(text: str) -> str:
        text = fixes.fix_character_width(fixes.fix_latin_ligatures(text))
        return fixes.remove_control_chars(fixes.uncurl_quotes(text))

    quotes = {0x02BC, *range(0x2018, 0x2020)}
    codes = set(chardata.LIGATURES) | set(chardata.WIDTH_MAP) | set(chardata.CONTROL_CHARS)
    pairs = sorted((chr(c), fix(chr(c))) for c in codes | quotes if c and fix(chr(c)) != chr(c))
    set_min_log_level(1)  # its builder logs the charsmap size at INFO on stderr
    normalizer = SentencePieceNormalizer(
        norm_map=pairs,
        add_dummy_prefix=False,
        escape_whitespaces=False,
        remove_extra_whitespaces=False,
    )
    spec: Any = spm_pb2.NormalizerSpec()  # type: ignore[attr-defined]  # generated, untyped
    spec.ParseFromString(normalizer.serialized_normalizer_spec())
    charsmap: bytes = spec.precompiled_charsmap
    return charsmap
