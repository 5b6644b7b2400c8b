"""Train the demo CLIP from scratch on generated scenes, then export it as a bundle.

`clipsearch train-demo --out DIR` reproduces the committed demo model
(server/models/demo): a small Hugging Face `CLIPModel` learns to match rendered shape
scenes with English and Chinese captions, is saved in HF format (with its byte-level BPE
tokenizer and a CLIPImageProcessor config), exported through the same path as any CLIP
checkpoint, and evaluated on held-out scenes through the server's ONNX encoder; the figures
go into the manifest's `evaluation`. `--architecture chinese_clip` trains the second demo
model (server/models/demo-zh) with the same recipe as a `ChineseCLIPModel`: a BERT text
tower over a WordPiece vocabulary of the captions in both languages (export/demo_wordpiece.py),
images resized straight to the square as the OFA-Sys checkpoints are.

What makes it learn on a CPU in minutes (see docs/MODELS.md for the measurements):
- every batch is freshly rendered (no epoch, no overfitting) from one seeded generator;
- a contrastive loss whose targets count every batch item with the same meaning (the same
  set of coloured shapes, whatever the wording or language) as a positive: with a few dozen
  classes a batch of 64 repeats each several times, and plain CLIP loss would push identical
  captions apart;
- 32 px images in 8 px patches, batches of 64, fp32 on one thread with flushed denormals:
  4,000 steps take about 15 minutes on one core, and reruns are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.export import demo_data, demo_eval, demo_tokenizer, demo_wordpiece
from clipsearch.server.bundle import MANIFEST_FILE, VisionSpec

if TYPE_CHECKING:
    import torch
    from transformers import CLIPModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("fp32", "int8", "int8-static")
# "clip": CLIPModel + byte-level BPE (server/models/demo); "chinese_clip": ChineseCLIPModel,
# a BERT text tower + WordPiece, images resized straight to the square (server/models/demo-zh).
ARCHITECTURES = ("clip", "chinese_clip")
BUNDLE_NAMES = {"clip": "clipsearch-demo", "chinese_clip": "clipsearch-demo-zh"}
_TRAINING_STREAM = 0x7D3E0  # keeps training scenes apart from demo_eval.EVAL_SEED's


@dataclass(frozen=True)
class DemoTrainConfig:
    seed: int = 0
    architecture: str = "clip"
    steps: int = 4000
    # Measured here (docs/MODELS.md): at equal samples seen, batches of 64 beat 128, and
    # 32 px with 8 px patches beat 64 px with 16 px patches (same 16 tokens, faster).
    batch_size: int = 64
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    vision_layers: int = 4
    # The captions are a small, regular language: two layers read them; the vision tower
    # gets the compute (shape is what is hard to learn).
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    two_object_fraction: float = demo_data.DEFAULT_TWO_OBJECT_FRACTION
    chinese_fraction: float = 0.5
    # One thread: bit-identical results whatever the machine's core count, and on a shared
    # 2-core machine 2 torch threads were 3x slower than 1 (OpenMP threads wait on each
    # other whenever another process takes a core).
    threads: int = 1
    # bf16 autocast pays off only on CPUs with native bf16 (AVX-512 BF16 / AMX); on AVX2
    # (this project's 2-core machine) it is emulated and ~10x slower than fp32.
    bf16: bool = False
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    eval_images: int = demo_eval.DEFAULT_EVAL_IMAGES


@dataclass(frozen=True)
class TrainingResult:
    model: Any  # CLIPModel
    tokenizer: Any  # CLIPTokenizer
    seconds: float
    steps_per_second: float
    final_loss: float


def vision_spec(config: DemoTrainConfig) -> VisionSpec:
    return VisionSpec(
        image_size=config.image_size,
        resize_shortest_edge=config.image_size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize="squash" if config.architecture == "chinese_clip" else "shortest_edge",
        crop="none" if config.architecture == "chinese_clip" else "center",
    )


def build_tokenizer(config: DemoTrainConfig) -> Any:
    if config.architecture == "chinese_clip":
        return demo_wordpiece.build_demo_wordpiece_tokenizer()
    return demo_tokenizer.build_demo_tokenizer()


def training_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _TRAINING_STREAM]))


# --- model ------------------------------------------------------------------------------


def build_model(config: DemoTrainConfig, tokenizer: Any) -> Any:
    if config.architecture == "chinese_clip":
        return build_chinese_clip_model(config, tokenizer)
    if config.architecture != "clip":
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {config.architecture}")
    from transformers import CLIPConfig, CLIPModel

    tower = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.heads,
        "hidden_act": "quick_gelu",
        "projection_dim": config.projection_dim,
    }
    # CLIP pools the text tower at the first eos_token_id: the config must name the real
    # ids (the default 49407 does not exist in a small vocabulary).
    text_config = {
        **tower,
        "num_hidden_layers": config.text_layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": demo_tokenizer.CONTEXT_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        **tower,
        "num_hidden_layers": config.vision_layers,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": 3,
    }
    clip_config = CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=config.projection_dim,
    )
    model = CLIPModel(clip_config)
    # sdpa's bf16 backward on CPU is about twice as slow as eager attention.
    model.set_attn_implementation("eager")
    return model


def build_chinese_clip_model(config: DemoTrainConfig, tokenizer: Any) -> Any:
    """ChineseCLIPModel: a BERT text tower (GELU, [CLS] pooling) and the same ViT as the CLIP."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    text_config = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.heads,
        "num_hidden_layers": config.text_layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": demo_wordpiece.CONTEXT_LENGTH,
        "type_vocab_size": 2,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.heads,
        "hidden_act": "quick_gelu",
        "projection_dim": config.projection_dim,
        "num_hidden_layers": config.vision_layers,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": 3,
    }
    model = ChineseCLIPModel(
        ChineseCLIPConfig(
            text_config=text_config,
            vision_config=vision_config,
            projection_dim=config.projection_dim,
        )
    )
    model.set_attn_implementation("eager")
    return model


def image_processor(config: DemoTrainConfig) -> Any:
    from transformers import CLIPImageProcessor

    if config.architecture == "chinese_clip":
        from transformers import ChineseCLIPImageProcessorPil

        # As the OFA-Sys checkpoints: straight to height x width, no centre crop.
        return ChineseCLIPImageProcessorPil(
            size={"height": config.image_size, "width": config.image_size},
            crop_size={"height": config.image_size, "width": config.image_size},
            do_resize=True,
            do_center_crop=False,
            resample=3,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    return CLIPImageProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        do_resize=True,
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def text_features(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if "attention_mask" in inputs:  # ChineseCLIP's BERT: the projected [CLS] state
        state = model.text_model(**inputs).last_hidden_state
        return model.text_projection(state[:, 0])  # type: ignore[no-any-return]
    pooled = model.text_model(input_ids=inputs["input_ids"]).pooler_output
    return model.text_projection(pooled)  # type: ignore[no-any-return]


def image_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)  # type: ignore[no-any-return]


# --- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 [B, S, S, 3]
    captions: list[str]
    labels: np.ndarray  # int64 [B]: equal labels = same meaning (same set of coloured shapes)


def make_batch(rng: np.random.Generator, config: DemoTrainConfig) -> Batch:
    images = np.empty((config.batch_size, config.image_size, config.image_size, 3), np.uint8)
    captions, keys = [], []
    for i in range(config.batch_size):
        scene = demo_data.sample_scene(rng, config.two_object_fraction)
        images[i] = demo_data.render_array(scene, config.image_size)
        language = "zh" if rng.random() < config.chinese_fraction else "en"
        captions.append(demo_data.caption_text(scene.pairs, language, rng))
        keys.append(scene.key)
    label_of: dict[frozenset[tuple[str, str]], int] = {}
    labels = np.array([label_of.setdefault(k, len(label_of)) for k in keys], dtype=np.int64)
    return Batch(images=images, captions=captions, labels=labels)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalized float32 [B, 3, S, S], as CLIPImageProcessor does."""
    import torch

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def text_inputs(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The text tower's inputs: CLIP takes input_ids alone, a BERT tower all three."""
    encoded = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    if "token_type_ids" in encoded:
        return {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return {"input_ids": encoded["input_ids"]}


# --- training ---------------------------------------------------------------------------


def same_meaning_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every same-meaning pair as a positive.

    Embeddings are L2-normalized; `labels` are equal for items of the same meaning. Each
    row's target is spread evenly over its positives (itself included).
    """
    import torch.nn.functional as F

    logits = scale * image_embeds @ text_embeds.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def learning_rate_factor(step: int, config: DemoTrainConfig) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    config: DemoTrainConfig,
    log: Callable[[str], None] = print,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainingResult:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(config.threads)
    # Denormal floats make CPU matmuls crawl late in training (measured 6x on these cores).
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config)
    model: Any = build_model(config, tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config)
    )
    rng = training_rng(config.seed)
    held_out = None
    if config.eval_every and on_eval is not None:
        held_out = demo_eval.held_out_set(vision_spec(config), n=config.eval_images)
    log(
        f"training demo {config.architecture}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{config.steps} steps of {config.batch_size}, {config.threads} threads"
    )
    started = time.perf_counter()
    data_seconds, loss_value = 0.0, float("nan")
    for step in range(config.steps):
        data_started = time.perf_counter()
        batch = make_batch(rng, config)
        pixels = pixel_values(batch.images)
        ids = text_inputs(tokenizer, batch.captions)
        labels = torch.from_numpy(batch.labels)
        data_seconds += time.perf_counter() - data_started
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            image_embeds = image_features(model, pixels)
            text_embeds = text_features(model, ids)
        loss = same_meaning_loss(
            F.normalize(image_embeds.float(), dim=-1),
            F.normalize(text_embeds.float(), dim=-1),
            model.logit_scale.exp().clamp(max=100.0),
            labels,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - started
            log(
                f"step {done}/{config.steps} loss {loss_value:.4f} "
                f"scale {float(model.logit_scale.detach().exp()):.1f} "
                f"lr {schedule.get_last_lr()[0]:.2e} {elapsed:.0f} s "
                f"({done / elapsed:.2f} steps/s, data {data_seconds / elapsed:.0%})"
            )
        if held_out is not None and on_eval is not None and done % config.eval_every == 0:
            model.eval()
            on_eval(done, demo_eval.evaluate(*torch_encoders(model, tokenizer), held_out))
            model.train()
    model.eval()
    seconds = time.perf_counter() - started
    return TrainingResult(
        model=model,
        tokenizer=tokenizer,
        seconds=seconds,
        steps_per_second=config.steps / seconds if seconds else 0.0,
        final_loss=loss_value,
    )


def torch_encoders(
    model: CLIPModel, tokenizer: Any
) -> tuple[demo_eval.TextEncoder, demo_eval.ImageEncoder]:
    """fp32 PyTorch counterparts of OnnxEncoder.encode_text / run_vision."""
    import torch
    import torch.nn.functional as F

    def encode_text(texts: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            vectors = F.normalize(text_features(model, text_inputs(tokenizer, texts)), dim=-1)
        return vectors.numpy()

    def encode_images(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            vectors = F.normalize(image_features(model, torch.from_numpy(pixels)), dim=-1)
        return vectors.numpy()

    return encode_text, encode_images


# --- checkpoint, export, evaluation -------------------------------------------------------


def save_checkpoint(result: TrainingResult, config: DemoTrainConfig, out: Path) -> Path:
    """The HF checkpoint: CLIPModel weights + config, tokenizer, image processor config."""
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out)
    result.tokenizer.save_pretrained(out)
    if config.architecture == "chinese_clip":
        demo_wordpiece.write_vocab_file(out)  # vocab.txt, as BERT checkpoints ship it
    else:
        demo_tokenizer.write_tokenizer_files(out)  # vocab.json + merges.txt, as CLIP ships them
    image_processor(config).save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({"config": asdict(config), "seconds": round(result.seconds, 1)}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    return out


def record_evaluation(bundle_dir: Path, evaluation: dict[str, float]) -> None:
    """Write the held-out figures into the bundle manifest's `evaluation`."""
    from clipsearch.server.bundle import load_bundle

    manifest = load_bundle(bundle_dir).manifest
    updated = replace(manifest, evaluation={k: round(v, 4) for k, v in evaluation.items()})
    (bundle_dir / MANIFEST_FILE).write_text(updated.to_json(), encoding="utf-8")


def export_and_evaluate(
    checkpoint: Path, out: Path, config: DemoTrainConfig, log: Callable[[str], None] = print
) -> dict[str, float]:
    from clipsearch.export.exporter import export_bundle

    export_bundle(
        checkpoint,
        out,
        precisions=PRECISIONS,
        name=BUNDLE_NAMES[config.architecture],
        source=f"clipsearch train-demo --architecture {config.architecture} --seed "
        f"{config.seed} --steps {config.steps}"
        if config.architecture != "clip"
        else f"clipsearch train-demo --seed {config.seed} --steps {config.steps}",
    )
    held_out = demo_eval.held_out_set(vision_spec(config), n=config.eval_images)
    evaluation: dict[str, float] = {}
    for precision in PRECISIONS:
        figures = demo_eval.evaluate_bundle(out, precision, held_out)
        log(f"{precision}: " + json.dumps({k: round(v, 4) for k, v in figures.items()}))
        evaluation.update({f"{precision}.{k}": v for k, v in figures.items()})
    record_evaluation(out, evaluation)
    return evaluation


def config_from_args(args: argparse.Namespace) -> DemoTrainConfig:
    config = DemoTrainConfig(seed=args.seed)
    overrides = {
        "steps": getattr(args, "steps", None),
        "batch_size": getattr(args, "batch_size", None),
        "threads": getattr(args, "threads", None),
        "eval_every": getattr(args, "eval_every", None),
        "eval_images": getattr(args, "eval_images", None),
        "architecture": getattr(args, "architecture", None),
    }
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def on_eval(step: int, figures: dict[str, float]) -> None:
        log(f"eval@{step}: " + json.dumps({k: round(v, 3) for k, v in figures.items()}))

    result = train(config, log=log, on_eval=on_eval)
    log(f"trained in {result.seconds:.0f} s ({result.steps_per_second:.2f} steps/s)")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="clipsearch-demo-") as scratch:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(scratch) / "checkpoint"
        save_checkpoint(result, config, checkpoint)
        log(f"saved the Hugging Face checkpoint to {checkpoint}")
        if args.no_export:
            return 0
        evaluation = export_and_evaluate(checkpoint, out, config, log)
    failed = [
        f"{precision} {miss}"
        for precision in PRECISIONS
        for miss in demo_eval.misses(
            {k.removeprefix(precision + "."): v for k, v in evaluation.items()}
        )
    ]
    if failed:
        log(f"the model in {out} misses the demo bars: " + "; ".join(failed))
        return 1
    log(f"wrote the demo bundle to {out}")
    return 0
