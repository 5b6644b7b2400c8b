"""Held-out evaluation of a demo model, through any pair of encode functions.

The held-out set is generated with its own seed (never used for training), rendered as the
gallery renders it (JPEG at the gallery size) and preprocessed by the server's
`ImagePreprocessor`, so the figures describe what the service sees. The same metrics run on
the PyTorch model during training and on the exported ONNX bundle through the server's
`OnnxEncoder` (`evaluate_bundle`), which is what the manifest records.

Metrics (all on the held-out set):
- zero_shot_{colour,shape}_acc[_zh]: single-object images classified among the prompts of
  every (colour, shape) pair ("a red circle" / "红色的圆形"); is the colour / shape right.
- t2i_r1_{en,zh}: every single-object caption template and synonym for every (colour, shape)
  as a query over the single-object images; does the top image have that colour and shape.
- t2i_r1_{en,zh}_mixed: the same over all images, one- and two-object; a hit when any
  object of the top image has the caption's colour and shape.
- t2i_r1_pairs_{en,zh}: two-object captions over all images; the top image shows both.
- i2i_p5: each single-object image as a query over the other single-object images; the
  share of the top 5 with the same colour and shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsearch.export import demo_data
from clipsearch.server.bundle import VisionSpec, load_bundle
from clipsearch.server.images import ImagePreprocessor

EVAL_SEED = 987_654_321  # training draws from other streams: see train_demo.training_rng
DEFAULT_EVAL_IMAGES = 800

TextEncoder = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, dim], L2-normalized
ImageEncoder = Callable[[np.ndarray], np.ndarray]  # pixel_values [n,3,S,S] -> [n, dim], normalized

BARS = {
    "zero_shot_colour_acc": 0.95,
    "zero_shot_shape_acc": 0.85,
    "t2i_r1_en": 0.8,
    "t2i_r1_zh": 0.75,
    "i2i_p5": 0.8,
}


@dataclass(frozen=True)
class HeldOutSet:
    pixel_values: np.ndarray  # float32 [n, 3, S, S], as the server preprocesses them
    objects: tuple[tuple[tuple[str, str], ...], ...]  # (colour, shape) per object per image

    @property
    def single(self) -> np.ndarray:
        return np.array([len(o) == 1 for o in self.objects])


def held_out_set(
    vision: VisionSpec,
    n: int = DEFAULT_EVAL_IMAGES,
    seed: int = EVAL_SEED,
    gallery_size: int = demo_data.DEFAULT_IMAGE_SIZE,
) -> HeldOutSet:
    preprocess = ImagePreprocessor(vision)
    pixels, objects = [], []
    for index in range(n):
        scene = demo_data.sample_scene(demo_data.scene_rng(seed, index))
        jpeg = demo_data.encode_jpeg(demo_data.render_scene(scene, gallery_size))
        pixels.append(preprocess(jpeg))
        objects.append(scene.pairs)
    return HeldOutSet(pixel_values=np.stack(pixels), objects=tuple(objects))


def all_pairs() -> list[tuple[str, str]]:
    return [(c.name, s.name) for c in demo_data.COLOURS for s in demo_data.SHAPES]


def single_object_queries(language: str) -> list[tuple[str, tuple[str, str]]]:
    """Every single-object template x shape synonym, for every (colour, shape)."""
    templates = demo_data.EN_SINGLE_TEMPLATES if language == "en" else demo_data.ZH_SINGLE_TEMPLATES
    words = demo_data.EN_SHAPE_WORDS if language == "en" else demo_data.ZH_SHAPE_WORDS
    queries = []
    for colour, shape in all_pairs():
        c = demo_data.COLOUR_BY_NAME[colour]
        c_word = c.en if language == "en" else c.zh
        for template, s_word in itertools.product(templates, words[shape]):
            obj = f"{demo_data.indefinite_article(c_word)} {c_word} {s_word}"
            queries.append((template.format(obj=obj, c=c_word, s=s_word), (colour, shape)))
    return queries


def pair_queries(held_out: HeldOutSet, language: str) -> list[tuple[str, frozenset[object]]]:
    """The canonical caption of each distinct two-object scene of the held-out set."""
    seen: dict[frozenset[object], str] = {}
    for objects in held_out.objects:
        if len(objects) == 2:
            seen.setdefault(frozenset(objects), demo_data.caption_text(objects, language))
    return [(text, key) for key, text in seen.items()]


def evaluate(
    encode_text: TextEncoder, encode_images: ImageEncoder, held_out: HeldOutSet
) -> dict[str, float]:
    image_vectors = _batched_images(encode_images, held_out.pixel_values)
    single = held_out.single
    single_vectors = image_vectors[single]
    single_pairs = [o[0] for o, s in zip(held_out.objects, single, strict=True) if s]
    results: dict[str, float] = {}

    pairs = all_pairs()
    for language, suffix in (("en", ""), ("zh", "_zh")):
        prompts = [demo_data.caption_text((p,), language) for p in pairs]
        predicted = np.argmax(single_vectors @ encode_text(prompts).T, axis=1)
        truth = [pairs.index(p) for p in single_pairs]
        results[f"zero_shot_colour_acc{suffix}"] = float(
            np.mean([pairs[p][0] == pairs[t][0] for p, t in zip(predicted, truth, strict=True)])
        )
        results[f"zero_shot_shape_acc{suffix}"] = float(
            np.mean([pairs[p][1] == pairs[t][1] for p, t in zip(predicted, truth, strict=True)])
        )

    for language in ("en", "zh"):
        queries = single_object_queries(language)
        text_vectors = encode_text([q for q, _ in queries])
        top_single = np.argmax(text_vectors @ single_vectors.T, axis=1)
        results[f"t2i_r1_{language}"] = float(
            np.mean(
                [single_pairs[i] == want for i, (_, want) in zip(top_single, queries, strict=True)]
            )
        )
        top_all = np.argmax(text_vectors @ image_vectors.T, axis=1)
        results[f"t2i_r1_{language}_mixed"] = float(
            np.mean(
                [want in held_out.objects[i] for i, (_, want) in zip(top_all, queries, strict=True)]
            )
        )
        two = pair_queries(held_out, language)
        if two:
            top = np.argmax(encode_text([q for q, _ in two]) @ image_vectors.T, axis=1)
            results[f"t2i_r1_pairs_{language}"] = float(
                np.mean(
                    [
                        frozenset(held_out.objects[i]) == key
                        for i, (_, key) in zip(top, two, strict=True)
                    ]
                )
            )

    similarity = single_vectors @ single_vectors.T
    np.fill_diagonal(similarity, -np.inf)
    top5 = np.argsort(-similarity, axis=1, kind="stable")[:, :5]
    labels = np.array([pairs.index(p) for p in single_pairs])
    results["i2i_p5"] = float(np.mean(labels[top5] == labels[:, None]))
    results["n_single_images"] = float(single.sum())
    results["n_images"] = float(len(held_out.objects))
    return results


def evaluate_bundle(
    bundle_dir: str | Path, precision: str, held_out: HeldOutSet | None = None
) -> dict[str, float]:
    """The figures of one precision variant, through the server's OnnxEncoder."""
    from clipsearch.server.encoder import EncoderOptions, OnnxEncoder

    bundle = load_bundle(bundle_dir)
    encoder = OnnxEncoder(bundle, EncoderOptions(precision=precision, warmup=False))
    held_out = held_out or held_out_set(bundle.manifest.vision)
    return evaluate(encoder.encode_text, encoder.run_vision, held_out)


def misses(figures: dict[str, float]) -> list[str]:
    """The bars of issue 3 that `figures` do not meet, as readable lines."""
    return [
        f"{name} = {figures.get(name, float('nan')):.3f} < {bar}"
        for name, bar in BARS.items()
        if not figures.get(name, 0.0) >= bar
    ]


def _batched_images(
    encode_images: ImageEncoder, pixels: np.ndarray, batch: int = 128
) -> np.ndarray:
    return np.concatenate(
        [encode_images(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    )
