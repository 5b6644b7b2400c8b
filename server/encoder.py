"""The text and vision towers of a bundle on ONNX Runtime.

Outputs are L2-normalized float32, so inner product = cosine. Preprocessing (tokenizing,
decoding images) is separate, so callers can run it in threads ahead of inference; the
`encode_*` conveniences do both for callers that don't batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from clipsearch.server.bundle import Bundle, Manifest
from clipsearch.server.errors import BundleError, ConfigurationError, ProviderUnavailable
from clipsearch.server.images import ImageLimits, ImagePreprocessor
from clipsearch.server.limits import GRAPH_OPTIMIZATION_LEVELS
from clipsearch.server.text import TextTokenizer
from clipsearch.server.vectors import l2_normalize

if TYPE_CHECKING:
    from clipsearch.server.settings import Settings

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = frozenset({"cuda", "tensorrt"})


@dataclass(frozen=True)
class EncoderOptions:
    precision: str = "auto"
    providers: tuple[str, ...] = ("cpu",)
    allow_cpu_fallback: bool = False
    intra_op_threads: int = 0
    graph_optimization: str = "all"
    warmup: bool = True
    warmup_batch_sizes: tuple[int, ...] = (1, 8)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    fast_jpeg: bool = True
    strict_text_length: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EncoderOptions:
        sizes = tuple(sorted({1, min(8, settings.max_batch_size), settings.max_batch_size}))
        return cls(
            precision=settings.precision,
            providers=settings.providers,
            allow_cpu_fallback=settings.allow_cpu_fallback,
            intra_op_threads=settings.intra_op_threads,
            graph_optimization=settings.graph_optimization,
            warmup=settings.warmup,
            warmup_batch_sizes=sizes,
            image_limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
            fast_jpeg=settings.fast_jpeg,
            strict_text_length=settings.strict_text_length,
        )


def choose_precision(
    asked: str,
    providers: Sequence[str],
    available: Sequence[str],
    batch_invariant: Collection[str] = (),
) -> str:
    """auto: fp16 on a GPU where the bundle has it; on CPU int8-static where the bundle has
    one that passed the export's batch-invariance gate (`batch_invariant` names those);
    else fp32.

    Dynamic int8 is never chosen by itself: it scales activations per batch, so an int8
    vector depends (slightly: cosine ~0.995) on which other items shared its batch, and the
    same image or query would not always get the same vector. int8-static's scales are
    fixed at export: the same item gets the same vector alone or in a batch of 32.
    """
    on_gpu = providers[0] in GPU_PROVIDERS
    if asked == "auto":
        if on_gpu:
            return "fp16" if "fp16" in available else "fp32"
        static = "int8-static"
        return static if static in available and static in batch_invariant else "fp32"
    if asked not in available:
        raise BundleError(
            f"precision {asked} was asked for but the bundle has only {sorted(available)}"
        )
    if asked == "fp16" and not on_gpu:
        raise ConfigurationError(
            "the fp16 variant is for GPUs (CPU kernels for fp16 are slow or missing); "
            "use --precision fp32, int8-static or int8 on CPU, or --device cuda"
        )
    return asked


def resolve_providers(
    asked: Sequence[str], available: Sequence[str], allow_cpu_fallback: bool
) -> list[str]:
    """ONNX Runtime provider names for `asked`, in order; CPU always last for op fallback."""
    names: list[str] = []
    for short in asked:
        name = PROVIDER_NAMES[short]
        if name in available:
            names.append(name)
        elif short in GPU_PROVIDERS and not allow_cpu_fallback:
            raise ProviderUnavailable(
                f"execution provider {short!r} ({name}) is not available in this onnxruntime "
                f"build (available: {', '.join(available)}). Install clipsearch[gpu] "
                "(onnxruntime-gpu) with a matching CUDA, or pass --allow-cpu-fallback to run "
                "on CPU instead."
            )
        else:
            log.warning("execution provider %s is not available; skipping it", name)
    if PROVIDER_NAMES["cpu"] not in names:
        names.append(PROVIDER_NAMES["cpu"])
    return names


class OnnxEncoder:
    def __init__(self, bundle: Bundle, options: EncoderOptions | None = None) -> None:
        self.options = options = options or EncoderOptions()
        if options.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ConfigurationError(f"unknown graph optimization {options.graph_optimization}")
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.tokenizer = TextTokenizer.from_bundle(bundle, strict=options.strict_text_length)
        self.preprocessor = ImagePreprocessor.from_bundle(
            bundle, limits=options.image_limits, fast_jpeg=options.fast_jpeg
        )
        self.precision = choose_precision(
            options.precision,
            options.providers,
            list(self.manifest.variants),
            [name for name, v in self.manifest.variants.items() if v.is_batch_invariant()],
        )
        variant = bundle.variant(self.precision)
        providers = resolve_providers(
            options.providers, ort.get_available_providers(), options.allow_cpu_fallback
        )
        self._text = self._open(bundle.path(variant.text_file), providers)
        self._vision = self._open(bundle.path(variant.vision_file), providers)
        self._text_inputs = [i.name for i in self._text.get_inputs()]
        self._vision_input = self._vision.get_inputs()[0].name
        log.info(
            "model %s (%s, dim %d): text on %s, vision on %s",
            self.manifest.name,
            self.precision,
            self.dim,
            ",".join(self.text_providers),
            ",".join(self.vision_providers),
        )
        if options.warmup:
            self.warmup()

    def _open(self, path: os.PathLike[str], providers: list[str]) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.graph_optimization]
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = 1
        # Idle ORT threads would otherwise spin and take the cores image decoding needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"cannot load {path}: {exc}") from exc
        wanted = providers[0]
        running = session.get_providers()
        # A GPU provider that fails to initialize only logs, then ORT runs on CPU: refuse that.
        if running[0] != wanted and not self.options.allow_cpu_fallback:
            raise ProviderUnavailable(
                f"{wanted} was asked for but the session runs on {running[0]} "
                "(the provider failed to initialize; see the onnxruntime log). Pass "
                "--allow-cpu-fallback to accept that."
            )
        return session

    # --- facts ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def text_providers(self) -> list[str]:
        return list(self._text.get_providers())

    @property
    def vision_providers(self) -> list[str]:
        return list(self._vision.get_providers())

    # --- inference -----------------------------------------------------------------------

    def run_text(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One padded batch of token ids (see TextTokenizer.pad) to normalized vectors."""
        inputs = {name: feeds[name] for name in self._text_inputs}
        return l2_normalize(self._text.run(None, inputs)[0])

    def run_vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed images [batch, 3, S, S] to normalized vectors."""
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return l2_normalize(self._vision.run(None, {self._vision_input: pixels})[0])

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.run_text(self.tokenizer.pad(self.tokenizer.tokenize(texts)))

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.run_vision(np.stack(images))

    def warmup(self) -> None:
        """Run each tower at the configured batch sizes so the first request is not slow."""
        size = self.manifest.vision.image_size
        rng = np.random.default_rng(0)
        for batch in self.options.warmup_batch_sizes:
            self.run_vision(rng.standard_normal((batch, 3, size, size), dtype=np.float32))
            texts = ["warm up the text tower with a short sentence"] * batch
            self.encode_text(texts)
