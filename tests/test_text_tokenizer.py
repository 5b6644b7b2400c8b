"""The server's tokenizer (tokenizers + tokenizer.json) vs transformers' CLIPTokenizer.

The reference is openai/clip-vit-base-patch32's tokenizer, rebuilt offline from the vendored
BPE merges (49,408 tokens), called the way CLIP users call it:
tokenizer(texts, padding="longest", truncation=True, max_length=77).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import export_fixtures
import numpy as np
import pytest

from clipsearch.server.bundle import TextSpec
from clipsearch.server.errors import BundleError
from clipsearch.server.text import TextTokenizer, TokenizedText

BOS, EOS = 49406, 49407
SPEC = TextSpec(context_length=77, bos_id=BOS, eos_id=EOS, pad_id=EOS)

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a red circle next to a blue square",
    "红色的圆形",
    "一只黑色的狗在绿色的草地上奔跑，旁边有一棵树。",
    "日本語のテキストと한국어 텍스트",
    "Hello, world! How's it going? I'm fine; you'll see (maybe) [ok] {x}...",
    "emoji 🐱🚀👍🏽 and flags 🇫🇷 and zwj 👨‍👩‍👧",
    "",
    " ",
    "\t\n  \r\n",
    "   leading and trailing spaces   ",
    "multiple     internal\t\tspaces\n\nand newlines",
    "numbers 1234567890 3.14159 -42 1e10 2024-06-01",
    "email me at someone@example.com or visit https://example.com/path?q=1&x=2",
    "Ünïcödé àccents çedilla naïve café résumé",
    "e\u0301 (decomposed) vs \u00e9 (composed)",
    "<|startoftext|> special tokens in text <|endoftext|>",
    "don't won't can't it's we're they've I'd you'll",
    "x" * 400,
    " ".join(["word"] * 200),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "mixed 中文 and English words 混合 text",
    "!!!???...,,,;;;:::---___***",
    "\u200b zero width space and \u00a0 no-break space",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_fixtures.clip_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return export_fixtures.hf_clip_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer(tokenizer_dir / "tokenizer.json", SPEC)


def hf_ids(hf_tokenizer: Any, texts: list[str]) -> np.ndarray:
    out = hf_tokenizer(
        texts, padding="longest", truncation=True, max_length=77, return_tensors="np"
    )["input_ids"]
    return np.asarray(out, dtype=np.int64)


def test_vocabulary_is_openai_clips(tokenizer_dir: Path) -> None:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    assert merges[1] == "i n"
    assert vocab["!"] == 0
    assert vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == BOS
    assert vocab["<|endoftext|>"] == EOS


def test_known_ids_of_openai_clip(tokenizer: TextTokenizer) -> None:
    # The ids openai/clip-vit-base-patch32 gives (transformers docs and model card examples).
    assert tokenizer.tokenize(["a photo of a cat"])[0].ids.tolist() == [
        49406, 320, 1125, 539, 320, 2368, 49407,
    ]  # fmt: skip
    assert tokenizer.tokenize(["a photo of a dog"])[0].ids.tolist() == [
        49406, 320, 1125, 539, 320, 1929, 49407,
    ]  # fmt: skip


def test_padded_batch_matches_transformers_on_varied_corpus(
    tokenizer: TextTokenizer, hf_tokenizer: Any
) -> None:
    feeds = tokenizer.pad(tokenizer.tokenize(CORPUS))
    expected = hf_ids(hf_tokenizer, CORPUS)
    assert list(feeds) == ["input_ids"]
    assert feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].shape == expected.shape
    np.testing.assert_array_equal(feeds["input_ids"], expected)


def test_each_text_alone_matches_transformers(tokenizer: TextTokenizer, hf_tokenizer: Any) -> None:
    items = tokenizer.tokenize(CORPUS)
    for text, item in zip(CORPUS, items, strict=True):
        expected = hf_tokenizer(text, truncation=True, max_length=77)["input_ids"]
        assert item.ids.tolist() == list(expected), text


def test_empty_and_whitespace_texts_are_bos_eos(tokenizer: TextTokenizer) -> None:
    for item in tokenizer.tokenize(["", " ", "\t\n  "]):
        assert item.ids.tolist() == [BOS, EOS]
        assert not item.truncated


@pytest.mark.parametrize(("total", "truncated"), [(76, False), (77, False), (78, True)])
def test_truncation_boundary(
    tokenizer: TextTokenizer, hf_tokenizer: Any, total: int, truncated: bool
) -> None:
    text = " ".join(["a"] * (total - 2))  # "a" is one token (320): total - 2 + BOS + EOS
    item = tokenizer.tokenize([text])[0]
    assert item.truncated is truncated
    assert len(item.ids) == min(total, 77)
    assert item.ids[0] == BOS
    assert item.ids[-1] == EOS
    assert np.all(item.ids[1:-1] == 320)
    assert item.ids.tolist() == list(
        hf_tokenizer(text, truncation=True, max_length=77)["input_ids"]
    )


def test_truncation_keeps_the_start_and_ends_with_eos(tokenizer: TextTokenizer) -> None:
    words = [f"w{i}" for i in range(300)]
    item = tokenizer.tokenize([" ".join(words)])[0]
    head = tokenizer.tokenize([" ".join(words[:10])])[0]
    assert item.truncated
    assert len(item.ids) == 77
    assert item.ids[-1] == EOS
    assert item.ids[: len(head.ids) - 1].tolist() == head.ids[:-1].tolist()


def test_pads_to_longest_in_batch_not_to_context(tokenizer: TextTokenizer) -> None:
    items = tokenizer.tokenize(["a cat", "a photo of a red circle", ""])
    feeds = tokenizer.pad(items)
    ids = feeds["input_ids"]
    assert ids.shape == (3, max(len(i.ids) for i in items))
    assert ids.shape[1] < 77
    for row, item in zip(ids, items, strict=True):
        assert row[: len(item.ids)].tolist() == item.ids.tolist()
        assert np.all(row[len(item.ids) :] == SPEC.pad_id)


def test_pad_id_and_extra_inputs_follow_the_spec(tokenizer_dir: Path) -> None:
    spec = TextSpec(
        context_length=77,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=0,
        inputs=("input_ids", "attention_mask", "token_type_ids"),
    )
    tokenizer = TextTokenizer(tokenizer_dir / "tokenizer.json", spec)
    feeds = tokenizer.pad(tokenizer.tokenize(["a photo of a cat", "dog"]))
    assert list(feeds) == ["input_ids", "attention_mask", "token_type_ids"]
    assert feeds["input_ids"].tolist() == [
        [BOS, 320, 1125, 539, 320, 2368, EOS],
        [BOS, 1929, EOS, 0, 0, 0, 0],
    ]
    assert feeds["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert feeds["token_type_ids"].tolist() == [[0] * 7, [0] * 7]
    assert all(v.dtype == np.int64 for v in feeds.values())


def test_short_context_truncates_there(tokenizer_dir: Path) -> None:
    spec = TextSpec(context_length=5, bos_id=BOS, eos_id=EOS, pad_id=EOS)
    items = TextTokenizer(tokenizer_dir / "tokenizer.json", spec).tokenize(
        ["a photo of a cat", "a cat"]
    )
    assert items[0] == TokenizedText(ids=items[0].ids, truncated=True)
    assert items[0].ids.tolist() == [BOS, 320, 1125, 539, EOS]
    assert items[1].ids.tolist() == [BOS, 320, 2368, EOS]
    assert not items[1].truncated


def test_tokenizes_a_list_in_one_batch_call(tokenizer_dir: Path) -> None:
    tokenizer = TextTokenizer(tokenizer_dir / "tokenizer.json", SPEC)
    real = tokenizer._tokenizer
    calls: list[int] = []

    class Spy:
        def encode_batch(self, texts: list[str], add_special_tokens: bool) -> Any:
            calls.append(len(texts))
            return real.encode_batch(texts, add_special_tokens=add_special_tokens)

    tokenizer._tokenizer = Spy()  # type: ignore[assignment]
    tokenizer.tokenize(CORPUS)
    assert calls == [len(CORPUS)]


def test_concurrent_use_gives_the_same_ids(tokenizer: TextTokenizer) -> None:
    expected = [i.ids.tolist() for i in tokenizer.tokenize(CORPUS)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: tokenizer.tokenize(CORPUS), range(32)))
    for result in results:
        assert [i.ids.tolist() for i in result] == expected


def test_pad_refuses_an_empty_batch(tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="empty batch"):
        tokenizer.pad([])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TextSpec(77, BOS, EOS, EOS, inputs=("input_ids", "pixel_mask")), "not supported"),
        (TextSpec(77, BOS, EOS, EOS, inputs=("attention_mask",)), "not supported"),
        (TextSpec(77, BOS, 50000, EOS), "outside the vocabulary"),
        (TextSpec(77, BOS, EOS, EOS, truncation="keep_end"), "truncation"),
    ],
)
def test_bad_specs_are_refused(tokenizer_dir: Path, spec: TextSpec, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        TextTokenizer(tokenizer_dir / "tokenizer.json", spec)


def test_unreadable_tokenizer_file_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="cannot load tokenizer"):
        TextTokenizer(bad, SPEC)
