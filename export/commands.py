"""Subcommands of the offline side: export, train-demo, demo-data.

Only argparse here: handlers import torch/transformers when they run.
"""

from __future__ import annotations

import argparse
from typing import Any

from clipsearch.cli import require


def register(commands: Any) -> None:
    _register_export(commands)
    _register_train_demo(commands)
    _register_demo_data(commands)


def _register_export(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "export",
        help="turn a CLIP-family checkpoint into an ONNX model bundle",
        description=(
            "Export the text and vision towers of a CLIP, Chinese-CLIP, SigLIP or OpenCLIP "
            "checkpoint (or a multilingual text model + a CLIP vision tower) to ONNX, "
            "with precision variants, tokenizer.json and manifest.json, and check parity "
            "against PyTorch on fixed inputs. Exits non-zero, naming the tower, precision "
            "and shortfall, when a variant misses its parity bar "
            "(min cosine: fp32 0.9999, fp16 0.999, int8 and int8-static 0.99) or, for "
            "int8-static, its batch-invariance bar (an item alone vs in a batch of 32: min "
            "cosine 0.99999)."
        ),
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        default="",
        help="local directory or hub id (where the hub is reachable) of a CLIP "
        "(openai/clip-vit-base-patch32), Chinese-CLIP (OFA-Sys/chinese-clip-vit-base-patch16) "
        "or SigLIP (google/siglip-base-patch16-224) checkpoint, or an OpenCLIP one: a "
        "directory (open_clip_config.json + open_clip_model.safetensors) or "
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    )
    p.add_argument(
        "--text",
        default="",
        help="a sentence-transformers text model distilled into CLIP space "
        "(sentence-transformers/clip-ViT-B-32-multilingual-v1); needs --vision",
    )
    p.add_argument(
        "--vision",
        default="",
        help="the CLIP checkpoint whose vision tower pairs with --text "
        "(openai/clip-vit-base-patch32)",
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument(
        "--precision",
        default="fp32,int8,int8-static",
        help="comma list of variants: fp32, fp16 (GPU), int8 (dynamic quantization: fastest "
        "on CPU, vectors vary slightly with their batch-mates), int8-static (activation "
        "scales calibrated at export: batch-invariant, served by default on CPU) "
        "(default: fp32,int8,int8-static)",
    )
    p.add_argument(
        "--calibration",
        default="",
        help="images and texts that calibrate int8-static: a directory (its image files and "
        "the lines of its .txt files) or a .jsonl/.csv manifest (columns path and "
        "text/caption/caption_en/caption_zh) (default: a built-in deterministic set of "
        "rendered scenes, synthetic photos and captions)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--name", default="", help="model name in the manifest (default: derived)")
    p.add_argument("--revision", default="", help="hub revision to export (default: main)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    require("export", "torch", "transformers", "onnx")
    from clipsearch.export.exporter import main

    return main(args)


def _register_train_demo(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "train-demo",
        help="train the small demo CLIP from scratch and export it as a bundle",
        description=(
            "Train a small CLIP from scratch on generated shape scenes with English and "
            "Chinese captions (deterministic with --seed), save it in Hugging Face CLIPModel "
            "format, export it through 'clipsearch export', and record its held-out accuracy "
            "in the manifest. Reproduces the committed demo model."
        ),
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--architecture",
        choices=("clip", "chinese_clip"),
        default=None,
        help="clip: CLIPModel + byte-level BPE (server/models/demo, the default); "
        "chinese_clip: ChineseCLIPModel, BERT text tower + WordPiece (server/models/demo-zh)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the committed model's count; fewer for a quick try)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="scenes per step (default: 64)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1, which reproduces the committed model bit for bit; "
        "other counts change the float summation order)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="also evaluate on held-out scenes every N steps (default: only at the end)",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="held-out scenes to evaluate on (default: 800)",
    )
    p.add_argument(
        "--checkpoint",
        default="",
        help="also keep the Hugging Face checkpoint in this directory (default: discard it)",
    )
    p.add_argument(
        "--no-export",
        action="store_true",
        help="stop after saving the checkpoint (needs --checkpoint to keep anything)",
    )
    p.set_defaults(handler=_run_train_demo)


def _run_train_demo(args: argparse.Namespace) -> int:
    require("export", "torch", "transformers", "onnx")
    from clipsearch.export.train_demo import main

    return main(args)


def _register_demo_data(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "demo-data",
        help="generate the demo gallery: JPEG shape scenes with English and Chinese captions",
        description=(
            "Write N deterministic JPEG scenes of one or two coloured shapes, with an English "
            "and a Chinese caption each, plus manifest.csv and manifest.jsonl "
            "(id, path, caption_en, caption_zh, shape, colour). Needs no torch."
        ),
    )
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.set_defaults(handler=_run_demo_data)


def _run_demo_data(args: argparse.Namespace) -> int:
    require("server", "PIL")
    from clipsearch.export.demo_data import main

    return main(args)
