"""Text -> token ids for the text tower, from the bundle's tokenizer.json (no transformers).

Produces the feeds of the family's own tokenizer (transformers' CLIPTokenizer, BertTokenizer,
SiglipTokenizer ... with truncation=True, max_length=context_length), as the manifest's
TextSpec says: a start token (BOS / [CLS]) where the family has one, the text's tokens, the
end token (EOS / [SEP]); attention_mask and token_type_ids where the tower takes them. A text
longer than the context keeps its first tokens and still ends with the end token (CLIP pools
at EOS), and is reported as truncated, or, with `strict`, refused. Batches are padded to
their longest item, never to the context length (text cost grows with sequence length),
except for families that were trained on fixed-length text (SigLIP: padding "max_length").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from clipsearch.server.bundle import TEXT_INPUTS, TEXT_PADDINGS, TextSpec
from clipsearch.server.errors import BundleError, InvalidInput

if TYPE_CHECKING:
    from clipsearch.server.bundle import Bundle

SUPPORTED_INPUTS = TEXT_INPUTS


# Longer single texts are tokenized with `encode_batch`, which releases the GIL.
SHORT_TEXT_CHARS = 1024


@dataclass(frozen=True)
class TokenizedText:
    ids: np.ndarray  # int64 [n]: (BOS) ... EOS, n <= context_length
    truncated: bool  # the text was longer than the context length


class TextTokenizer:
    """Thread-safe: `tokenizers.Tokenizer.encode_batch` holds no per-call state here."""

    def __init__(self, tokenizer_file: Path, spec: TextSpec, strict: bool = False) -> None:
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
        if spec.padding not in TEXT_PADDINGS:
            raise BundleError(f"text padding {spec.padding!r} is not one of {TEXT_PADDINGS}")
        vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        specials = [i for i in (spec.bos_id, spec.eos_id, spec.pad_id) if i is not None]
        bad_ids = [i for i in specials if not 0 <= i < vocab_size]
        if bad_ids:
            raise BundleError(f"special token ids {bad_ids} are outside the vocabulary")
        # Special tokens are added here, not by the tokenizer's post-processor, so the ids
        # follow the manifest whatever post-processor tokenizer.json carries.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.spec = spec
        self.strict = strict
        self._n_special = 1 if spec.bos_id is None else 2
        self._max_body = spec.context_length - self._n_special

    @classmethod
    def from_bundle(cls, bundle: Bundle, strict: bool = False) -> TextTokenizer:
        return cls(bundle.tokenizer_path, bundle.manifest.text, strict=strict)

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Ids per text, (BOS) ... EOS, unpadded; one `encode_batch` call for several texts.

        With `strict`, a text longer than the context raises InvalidInput naming it.
        """
        if len(texts) == 1 and len(texts[0]) <= SHORT_TEXT_CHARS:
            # A short query: skip the batch call's thread-pool dispatch. `encode` holds the GIL
            # while it runs (`encode_batch` releases it), so long texts take the batch call.
            encodings = [self._tokenizer.encode(texts[0], add_special_tokens=False)]
        else:
            encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        bos, eos, keep = self.spec.bos_id, self.spec.eos_id, self._max_body
        start = 0 if bos is None else 1
        out: list[TokenizedText] = []
        for index, encoding in enumerate(encodings):
            body = encoding.ids
            if self.strict and len(body) > keep:
                raise InvalidInput(
                    f"text {index} is {len(body) + self._n_special} tokens long, over the "
                    f"model's context of {self.spec.context_length} (strict text length: "
                    "shorten it, or let the server truncate it)"
                )
            ids = np.empty(min(len(body), keep) + self._n_special, dtype=np.int64)
            if bos is not None:
                ids[0] = bos
            ids[start:-1] = body[:keep]
            ids[-1] = eos
            out.append(TokenizedText(ids=ids, truncated=len(body) > keep))
        return out

    def pad(self, items: Sequence[TokenizedText]) -> dict[str, np.ndarray]:
        """ONNX feeds for one batch, padded with pad_id to the longest item of the batch
        (or to the context length, for fixed-length families)."""
        if not items:
            raise ValueError("cannot pad an empty batch")
        longest = max(len(item.ids) for item in items)
        if self.spec.padding == "max_length":
            longest = self.spec.context_length
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
