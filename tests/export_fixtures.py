"""Costly export-side test material, built once per test session.

A test module wraps these in its own session-scoped fixtures:

    @pytest.fixture(scope="session")
    def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return export_fixtures.tiny_bundle(tmp_path_factory)

The tiny CLIP (hidden 32, 2 layers per tower, 32 px images, patch 8, projection 16) uses the
real 49,408-token OpenAI CLIP vocabulary, so tokenization is exactly openai/clip-vit-base-patch32's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

TINY_PRECISIONS = ("fp32", "int8", "fp16", "int8-static")

_lock = threading.Lock()
_built: dict[str, Any] = {}


def _once(key: str, factory: pytest.TempPathFactory, build: Any) -> Any:
    with _lock:
        if key not in _built:
            _built[key] = build(factory.mktemp(key))
        return _built[key]


def clip_tokenizer_dir(factory: pytest.TempPathFactory) -> Path:
    """vocab.json, merges.txt (openai/clip-vit-base-patch32's) and tokenizer.json."""

    def build(root: Path) -> Path:
        from clipsearch.export.tokenizers import clip_tokenizer, save_tokenizer_json

        save_tokenizer_json(clip_tokenizer(root), root / "tokenizer.json")
        return root

    result: Path = _once("clip_tokenizer", factory, build)
    return result


def hf_clip_tokenizer(factory: pytest.TempPathFactory) -> Any:
    """transformers' CLIPTokenizer (the fast, tokenizers-backed one) on the real vocabulary."""

    def build(root: Path) -> Any:
        from clipsearch.export.tokenizers import clip_tokenizer

        return clip_tokenizer(root)

    return _once("hf_clip_tokenizer", factory, build)


def tiny_checkpoint(factory: pytest.TempPathFactory) -> Path:
    def build(root: Path) -> Path:
        from clipsearch.export.tokenizers import make_random_clip_checkpoint, tiny_clip_config

        return make_random_clip_checkpoint(root / "tiny-clip", tiny_clip_config(), seed=0)

    result: Path = _once("tiny_checkpoint", factory, build)
    return result


def tiny_bundle(factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP exported with every precision (the exporter has checked parity)."""
    checkpoint = tiny_checkpoint(factory)

    def build(root: Path) -> Path:
        from clipsearch.export.exporter import export_bundle

        out = root / "bundle"
        export_bundle(checkpoint, out, precisions=TINY_PRECISIONS, progress=lambda _: None)
        return out

    result: Path = _once("tiny_bundle", factory, build)
    return result
