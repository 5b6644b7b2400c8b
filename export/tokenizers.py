"""OpenAI CLIP's tokenizer, rebuilt offline, and random-weight CLIP checkpoints that use it.

`clip_tokenizer_files` turns the vendored BPE merges (assets/README.md) into the vocab.json and
merges.txt of openai/clip-vit-base-patch32, exactly as open_clip's `SimpleTokenizer` builds its
vocabulary. Tests use the result as the reference tokenizer; the encoder benchmark uses
`make_random_clip_checkpoint()` (CLIPConfig() = ViT-B/32 with random weights) because no model
hub is reachable here.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPConfig

BPE_ASSET = Path(__file__).resolve().parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = VOCAB_SIZE - 2
EOS_ID = VOCAB_SIZE - 1
CONTEXT_LENGTH = 77
# open_clip keeps the first 49152 - 256 - 2 merges of the file (after its header line).
_N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    lines = gzip.decompress(BPE_ASSET.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(_pair(line) for line in lines[1 : _N_MERGES + 1])
    byte_tokens = list(bytes_to_unicode().values())
    vocab = [*byte_tokens, *(t + "</w>" for t in byte_tokens)]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"{BPE_ASSET} gave {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return tuple(vocab), merges


def _pair(line: str) -> tuple[str, str]:
    left, right = line.split()
    return left, right


def clip_tokenizer_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write openai/clip-vit-base-patch32's vocab.json and merges.txt into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    vocab_json = out / "vocab.json"
    merges_txt = out / "merges.txt"
    vocab_json.write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
        encoding="utf-8",
    )
    merges_txt.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab_json, merges_txt


def clip_tokenizer(work_dir: str | Path) -> Any:
    """openai/clip-vit-base-patch32's tokenizer (transformers' CLIPTokenizer, tokenizers-backed).

    `work_dir` receives vocab.json and merges.txt.
    """
    from transformers import CLIPTokenizer

    vocab_json, merges_txt = clip_tokenizer_files(work_dir)
    return CLIPTokenizer(
        vocab=str(vocab_json), merges=str(merges_txt), model_max_length=CONTEXT_LENGTH
    )


def save_tokenizer_json(hf_tokenizer: Any, path: str | Path) -> Path:
    """Save the `tokenizers` graph behind a transformers tokenizer, without padding/truncation.

    The server sets truncation and padding itself from the manifest's TextSpec.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    path = Path(path)
    backend.save(str(path))
    return path


def tiny_clip_config(**overrides: Any) -> CLIPConfig:
    """A CLIP small enough for tests (hidden 32, 2 layers, 32 px, patch 8) on the real vocab."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CONTEXT_LENGTH,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "projection_dim": 16,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 16,
    }
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)


def make_random_clip_checkpoint(
    out_dir: str | Path, config: CLIPConfig | None = None, seed: int = 0
) -> Path:
    """Save a random-weight CLIPModel + CLIP tokenizer + CLIPImageProcessor config in `out_dir`.

    `config=None` is CLIPConfig(): the ViT-B/32 architecture of openai/clip-vit-base-patch32.
    The text config's bos/eos/pad ids are set to the real tokenizer's so EOS pooling is right.
    Deterministic for a given seed.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_: Any = CLIPConfig() if config is None else config
    text_config = config_.text_config
    if text_config.vocab_size != VOCAB_SIZE:
        raise ValueError(f"the CLIP tokenizer needs text vocab_size {VOCAB_SIZE}")
    text_config.bos_token_id = BOS_ID
    text_config.eos_token_id = EOS_ID
    text_config.pad_token_id = EOS_ID
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: Any = CLIPModel(config_)
    model.eval()
    model.save_pretrained(out)

    tokenizer = clip_tokenizer(out)
    tokenizer.save_pretrained(out)
    size = int(config_.vision_config.image_size)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor.save_pretrained(out)
    return out
