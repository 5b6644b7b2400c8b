"""Tiny random checkpoints of every model family, with tokenizers built in the test.

No model hub is reachable: each builder makes a random-initialised model of the family's
architecture (hidden 32, 2 layers per tower, 32 px images), saves it in the family's own
checkpoint layout with a tokenizer and an image processor config, and returns the directory.
Built once per test session (see export_fixtures._once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from export_fixtures import _once

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
VISION = {**TOWER, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
PROJECTION = 16

# Texts the SentencePiece models learn from: English, Chinese (by character) and digits.
SP_CORPUS = [
    "a photo of a cat",
    "a red circle and a blue square on a white background",
    "the quick brown fox jumps over the lazy dog",
    "hello world, mixed text and english words 123 456 789",
    "price tag and prices, brackets and punctuation, emoji and stuff",
    "红色的圆形和蓝色的正方形",
    "一只黑色的狗在绿色的草地上奔跑",
    "你好世界, 混合文字和英语",
    "图片里有一个黄色的五角星",
] * 20


def chinese_clip_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """ChineseCLIPModel + a WordPiece vocabulary (English words, Chinese characters)."""

    def build(root: Path) -> Path:
        import torch
        from transformers import (
            ChineseCLIPConfig,
            ChineseCLIPImageProcessorPil,
            ChineseCLIPModel,
        )

        from clipsearch.export.demo_wordpiece import build_demo_wordpiece_tokenizer

        out = root / "tiny-chinese-clip"
        tokenizer = build_demo_wordpiece_tokenizer()
        text = {
            **TOWER,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 52,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config = ChineseCLIPConfig(
            text_config=text,
            vision_config={**VISION, "projection_dim": PROJECTION},
            projection_dim=PROJECTION,
        )
        torch.manual_seed(0)
        model: Any = ChineseCLIPModel(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # As OFA-Sys/chinese-clip-vit-base-patch16 ships it: straight to 32x32, no crop.
        ChineseCLIPImageProcessorPil(
            size={"height": 32, "width": 32}, do_center_crop=False
        ).save_pretrained(out)
        return out

    result: Path = _once("chinese_clip_checkpoint", factory, build)
    return result


def exported(
    factory: pytest.TempPathFactory,
    key: str,
    checkpoint: Path,
    precisions: tuple[str, ...] = ("fp32", "int8", "fp16"),
    **kwargs: Any,
) -> Path:
    """The checkpoint exported as `precisions` (the exporter has checked parity)."""

    def build(root: Path) -> Path:
        from clipsearch.export.exporter import export_bundle

        out = root / "bundle"
        export_bundle(checkpoint, out, precisions=precisions, progress=lambda _: None, **kwargs)
        return out

    result: Path = _once("bundle-" + key, factory, build)
    return result


def sentencepiece_model(root: Path, vocab_size: int = 120) -> Path:
    """A small SentencePiece Unigram model trained in-process on SP_CORPUS."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        bos_id=-1,
        pad_id=-1,
        eos_id=1,
        unk_id=2,
        minloglevel=2,
    )
    path = root / "spiece.model"
    path.write_bytes(buffer.getvalue())
    return path


def siglip_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """SiglipModel + SiglipTokenizer on a SentencePiece model trained in the test."""

    def build(root: Path) -> Path:
        import torch
        from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

        out = root / "tiny-siglip"
        out.mkdir()
        tokenizer = SiglipTokenizer(vocab_file=str(sentencepiece_model(root)))
        text = {
            **TOWER,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        }
        config = SiglipConfig(text_config=text, vision_config=VISION)
        torch.manual_seed(0)
        model: Any = SiglipModel(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # As google/siglip-base-patch16-224 ships it (at 32 px): a square resize, mean/std 0.5.
        SiglipImageProcessorPil(
            size={"height": 32, "width": 32},
            resample=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(out)
        return out

    result: Path = _once("siglip_checkpoint", factory, build)
    return result


def multilingual_text_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers directory as clip-ViT-B-32-multilingual-v1 lays it out:
    DistilBERT (cased WordPiece) -> mean Pooling -> Dense(32 -> 16, no bias, identity)."""

    def build(root: Path) -> Path:
        import json

        import torch
        from safetensors.torch import save_file
        from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

        from clipsearch.export.demo_wordpiece import build_vocab

        out = root / "tiny-multilingual"
        tokenizer = DistilBertTokenizer(
            vocab=build_vocab(), do_lower_case=False, tokenize_chinese_chars=True
        )
        config = DistilBertConfig(
            vocab_size=len(tokenizer),
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model: Any = DistilBertModel(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        write = lambda name, value: (out / name).write_text(json.dumps(value))  # noqa: E731
        write(
            "modules.json",
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Dense",
                    "type": "sentence_transformers.models.Dense",
                },
            ],
        )
        write("sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
        (out / "1_Pooling").mkdir()
        write(
            "1_Pooling/config.json",
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
        )
        (out / "2_Dense").mkdir()
        write(
            "2_Dense/config.json",
            {
                "in_features": 32,
                "out_features": PROJECTION,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        save_file(
            {"linear.weight": torch.randn(PROJECTION, 32) * 0.2}, out / "2_Dense/model.safetensors"
        )
        return out

    result: Path = _once("multilingual_text_checkpoint", factory, build)
    return result


OPENCLIP_CFG = {
    "model_cfg": {
        "embed_dim": PROJECTION,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "patch_size": 8,
            "head_width": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 4,
            "layers": 2,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def openclip_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """open_clip_config.json + open_clip_model.safetensors, as the LAION repositories hold,
    with OpenCLIP's own random initialisation of OPENCLIP_CFG (open_clip.CLIP)."""

    def build(root: Path) -> Path:
        import json

        import open_clip
        import torch
        from safetensors.torch import save_file

        out = root / "tiny-openclip"
        out.mkdir()
        (out / "open_clip_config.json").write_text(json.dumps(OPENCLIP_CFG))
        torch.manual_seed(0)
        model = open_clip.CLIP(**OPENCLIP_CFG["model_cfg"])  # type: ignore[arg-type]
        save_file(model.state_dict(), out / "open_clip_model.safetensors")
        return out

    result: Path = _once("openclip_checkpoint", factory, build)
    return result
