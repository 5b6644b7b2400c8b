"""The second demo model's tokenizer: a small BERT-style WordPiece vocabulary, built offline.

Chinese-CLIP's text tower is a BERT with a WordPiece vocabulary in which every Chinese
character is a token of its own (BERT's pre-tokenizer splits CJK characters apart). This
vocabulary has that layout, built from the demo captions in both languages:

- [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4 (BERT's special tokens);
- ASCII punctuation and common full-width Chinese punctuation, digits and letters, and the
  continuation pieces ##0-##9, ##a-##z, so any ASCII word tokenizes (into letters at worst)
  instead of becoming [UNK];
- every English word of the caption templates, shape synonyms and colours, plus the words a
  user of the demo is likely to type (demo_tokenizer.EXTRA_ENGLISH), lowercased;
- every Chinese character of the Chinese captions (and demo_tokenizer.EXTRA_CHINESE).

Other characters become [UNK], as in any BERT vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from clipsearch.export import demo_tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Chinese-CLIP's context length (its text towers are BERTs with 512 positions, used at 52).
CONTEXT_LENGTH = 52
_CJK_PUNCTUATION = "，。、：；！？（）《》“”‘’"


def build_vocab() -> dict[str, int]:
    english, chinese = demo_tokenizer.caption_vocabulary()
    singles = [*string.punctuation, *_CJK_PUNCTUATION, *string.digits, *string.ascii_lowercase]
    pieces = ["##" + ch for ch in (*string.digits, *string.ascii_lowercase)]
    tokens = [*SPECIAL_TOKENS, *singles, *pieces]
    tokens += [w for w in english if w not in tokens]
    tokens += [ch for ch in chinese if ch not in tokens]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("the demo WordPiece vocabulary has duplicate tokens")
    return {token: i for i, token in enumerate(tokens)}


def build_demo_wordpiece_tokenizer() -> Any:
    """A transformers BertTokenizer (tokenizers-backed) over the demo vocabulary."""
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=build_vocab(),
        do_lower_case=True,
        tokenize_chinese_chars=True,
        model_max_length=CONTEXT_LENGTH,
    )


def write_vocab_file(out: str | Path) -> Path:
    """vocab.txt, one token per line in id order, as BERT checkpoints ship it."""
    path = Path(out) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in build_vocab()), encoding="utf-8")
    return path
