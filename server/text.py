"""Text -> token ids for the text tower, from the bundle's tokenizer.json (no transformers).

Produces the ids of transformers' CLIPTokenizer(padding="longest", truncation=True,
max_length=context_length): BOS, the text's tokens, EOS. A text longer than the context keeps
its first context_length - 2 tokens and still ends with EOS (the tower pools at EOS), and is
reported as truncated. Batches are padded to their longest item, never to the context length:
text cost grows with sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from clipsearch.server.bundle import TextSpec
from clipsearch.server.errors import BundleError

if TYPE_CHECKING:
    from clipsearch.server.bundle import Bundle

SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TokenizedText:
    ids: np.ndarray  # int64 [n]: BOS ... EOS, n <= context_length
    truncated: bool  # the text was longer than the context length


class TextTokenizer:
    """Thread-safe: `tokenizers.Tokenizer.encode_batch` holds no per-call state here."""

    def __init__(self, tokenizer_file: Path, spec: TextSpec) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise BundleError(f"cannot load tokenizer {tokenizer_file}: {exc}") from exc
        unknown = [name for name in spec.inputs if name not in SUPPORTED_INPUTS]
        if unknown or "input_ids" not in spec.inputs:
            raise BundleError(
                f"text inputs {spec.inputs} are not supported (known: {SUPPORTED_INPUTS})"
            )
        if spec.truncation != "keep_start":
            raise BundleError(f"text truncation {spec.truncation!r} is not supported")
        vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        bad_ids = [i for i in (spec.bos_id, spec.eos_id, spec.pad_id) if not 0 <= i < vocab_size]
        if bad_ids:
            raise BundleError(f"special token ids {bad_ids} are outside the vocabulary")
        # Special tokens are added here, not by the tokenizer's post-processor, so the ids
        # follow the manifest whatever post-processor tokenizer.json carries.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.spec = spec
        self._max_body = spec.context_length - 2

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TextTokenizer:
        return cls(bundle.tokenizer_path, bundle.manifest.text)

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Ids per text, BOS ... EOS, unpadded; one `encode_batch` call for several texts."""
        if len(texts) == 1:  # a single query: skip the batch call's thread-pool dispatch
            encodings = [self._tokenizer.encode(texts[0], add_special_tokens=False)]
        else:
            encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        bos, eos, keep = self.spec.bos_id, self.spec.eos_id, self._max_body
        out: list[TokenizedText] = []
        for encoding in encodings:
            body = encoding.ids
            ids = np.empty(min(len(body), keep) + 2, dtype=np.int64)
            ids[0] = bos
            ids[1:-1] = body[:keep]
            ids[-1] = eos
            out.append(TokenizedText(ids=ids, truncated=len(body) > keep))
        return out

    def pad(self, items: Sequence[TokenizedText]) -> dict[str, np.ndarray]:
        """ONNX feeds for one batch, padded with pad_id to the longest item of the batch."""
        if not items:
            raise ValueError("cannot pad an empty batch")
        longest = max(len(item.ids) for item in items)
        input_ids = np.full((len(items), longest), self.spec.pad_id, dtype=np.int64)
        for row, item in enumerate(items):
            input_ids[row, : len(item.ids)] = item.ids
        feeds = {"input_ids": input_ids}
        if "attention_mask" in self.spec.inputs:
            lengths = np.array([len(item.ids) for item in items])
            feeds["attention_mask"] = (np.arange(longest) < lengths[:, None]).astype(np.int64)
        if "token_type_ids" in self.spec.inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return {name: feeds[name] for name in self.spec.inputs}
