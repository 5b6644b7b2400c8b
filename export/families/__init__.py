"""Model families: which adapter exports a checkpoint, by what the checkpoint is.

    load_family(checkpoint, revision, vision=None) -> FamilyModel

- a directory with `open_clip_config.json`, or `hf-hub:ORG/REPO` (downloaded): OpenCLIP;
- with `vision`: a sentence-transformers text model paired with a CLIP vision tower
  (`multilingual`);
- otherwise the transformers config's model_type: "clip", "chinese_clip", "siglip".
Anything else is refused with a message naming what it is and what is supported.
"""

from __future__ import annotations

from pathlib import Path

from clipsearch.export.families.base import ExportError, FamilyModel, hf_kwargs

SUPPORTED = (
    "CLIP (CLIPModel, model_type 'clip'), Chinese-CLIP (ChineseCLIPModel, 'chinese_clip'), "
    "SigLIP (SiglipModel, 'siglip'), OpenCLIP directories (open_clip_config.json + "
    "open_clip_model.safetensors) or hf-hub:ORG/REPO names, and a sentence-transformers "
    "text model paired with a CLIP vision tower (--text CKPT --vision CKPT)"
)


def load_family(
    checkpoint: str | Path, revision: str = "", *, vision: str | Path | None = None
) -> FamilyModel:
    if vision is not None:
        from clipsearch.export.families import multilingual

        return multilingual.load(checkpoint, vision, revision)
    if str(checkpoint).startswith("hf-hub:"):
        from clipsearch.export.families import openclip

        return openclip.load(openclip.download(str(checkpoint), revision))
    path = Path(str(checkpoint))
    if (path / "open_clip_config.json").is_file():
        from clipsearch.export.families import openclip

        return openclip.load(path)
    if (path / "modules.json").is_file():
        raise ExportError(
            f"{checkpoint} is a sentence-transformers model (a text encoder only): pair it "
            "with the CLIP checkpoint whose space it was trained into, as "
            f"`clipsearch export --text {checkpoint} --vision CLIP_CHECKPOINT`"
        )
    model_type = _model_type(checkpoint, revision)
    if model_type == "clip":
        from clipsearch.export.families import clip

        return clip.load(checkpoint, revision)
    if model_type == "chinese_clip":
        from clipsearch.export.families import chinese_clip

        return chinese_clip.load(checkpoint, revision)
    if model_type == "siglip":
        from clipsearch.export.families import siglip

        return siglip.load(checkpoint, revision)
    raise ExportError(f"{checkpoint} is a {model_type!r} model; supported: {SUPPORTED}")


def _model_type(checkpoint: str | Path, revision: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(checkpoint), **hf_kwargs(revision))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"cannot load checkpoint {checkpoint}: {exc}\nsupported: {SUPPORTED}"
        ) from exc
    return str(config.model_type)
