"""The demo model's tokenizer: a small CLIP-style byte-level BPE, built offline.

It has OpenAI CLIP's layout, so transformers' CLIPTokenizer(Fast) and the server's
tokenizer.json read it like the real one:

- ids 0..511: the 256 byte symbols, then the same with the end-of-word mark "</w>";
- merges that make every word of the demo captions' English vocabulary a single token
  (learned with classic BPE over those words, so common prefixes are shared);
- merges that build each Chinese character of the captions from its UTF-8 bytes. CLIP's
  pre-tokenizer keeps a run of Chinese as one "word", so merges learned on Chinese text
  would produce tokens spanning several characters; explicit per-character merges (none
  across characters) give one token per character in any sentence;
- `<|startoftext|>`, then `<|endoftext|>` as the very last id (CLIP pools the text tower at
  the end-of-text token, and the model config must name its real id).

Anything else still tokenizes: unknown words fall back to their bytes.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clipsearch.export import demo_data
from clipsearch.export.tokenizers import bytes_to_unicode

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
END_OF_WORD = "</w>"

# Words a user of the demo is likely to type besides the caption vocabulary.
EXTRA_ENGLISH = (
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "next",
    "to",
    "two",
    "one",
    "shape",
    "shapes",
    "object",
    "objects",
    "photo",
    "picture",
    "image",
    "drawing",
    "plain",
    "background",
    "coloured",
    "colored",
    "colour",
    "color",
    "find",
    "show",
    "me",
    "some",
)
EXTRA_CHINESE = "的和有一个张图片里照这是两形状颜色"


def caption_vocabulary() -> tuple[list[str], list[str]]:
    """(English words, Chinese characters) of every caption the demo model trains on."""
    english: set[str] = set(EXTRA_ENGLISH)
    chinese: set[str] = set(EXTRA_CHINESE)
    en_texts = [*demo_data.EN_SINGLE_TEMPLATES, *demo_data.EN_PAIR_TEMPLATES]
    en_texts += [w for words in demo_data.EN_SHAPE_WORDS.values() for w in words]
    en_texts += [c.en for c in demo_data.COLOURS]
    zh_texts = [*demo_data.ZH_SINGLE_TEMPLATES, *demo_data.ZH_PAIR_TEMPLATES]
    zh_texts += [w for words in demo_data.ZH_SHAPE_WORDS.values() for w in words]
    zh_texts += [c.zh for c in demo_data.COLOURS]
    for text in en_texts:
        english.update(_letter_runs(_strip_fields(text)))
    for text in zh_texts:
        chinese.update(ch for ch in _strip_fields(text) if _is_cjk(ch))
    return sorted(english), sorted(chinese)


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = bytes_to_unicode()
    base = list(byte_chars.values())
    tokens = base + [c + END_OF_WORD for c in base]
    english, chinese = caption_vocabulary()
    merges = _learn_word_merges(english, byte_chars) + _character_merges(chinese, byte_chars)
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("the demo vocabulary has duplicate tokens")
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_files(out: str | Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the files CLIPTokenizer loads) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab_path, merges_path


def build_demo_tokenizer() -> Any:
    """A transformers CLIPTokenizer (tokenizers-backed) over the demo vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges()
    # tokenizers' BPE takes merges as (left, right) pairs; CLIPTokenizer's annotation says
    # list[str], which it would then fail to parse.
    pairs: Any = merges
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=CONTEXT_LENGTH)


def _learn_word_merges(words: Iterable[str], byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Classic BPE over a word list, until every word is one symbol (ties: smallest pair)."""
    segmented: dict[str, list[str]] = {}
    for word in words:
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        segmented[word] = symbols
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in segmented.values():
            counts.update(itertools.pairwise(symbols))
        if not counts:
            return merges
        best_count = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best_count)
        merges.append(pair)
        for word, symbols in segmented.items():
            segmented[word] = _apply_merge(symbols, pair)


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _character_merges(chars: Iterable[str], byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Per character: byte 1 + byte 2, then + byte 3 (inside a word and at its end)."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for ch in chars:
        symbols = [byte_chars[b] for b in ch.encode("utf-8")]
        prefix = symbols[0]
        steps: list[tuple[str, str]] = []
        for symbol in symbols[1:-1]:
            steps.append((prefix, symbol))
            prefix += symbol
        steps += [(prefix, symbols[-1]), (prefix, symbols[-1] + END_OF_WORD)]
        for step in steps:
            if step not in seen:
                seen.add(step)
                merges.append(step)
    return merges


def _strip_fields(template: str) -> str:
    for name in ("obj1", "obj2", "obj", "c1", "c2", "s1", "s2", "c", "s"):
        template = template.replace("{" + name + "}", " ")
    return template


def _letter_runs(text: str) -> list[str]:
    runs, current = [], ""
    for ch in text.lower():
        if ch.isascii() and ch.isalpha():
            current += ch
        else:
            if current:
                runs.append(current)
            current = ""
    if current:
        runs.append(current)
    return runs


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"
