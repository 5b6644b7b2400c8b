"""The server's one settings object.

Every field is, with the same name: a `clipsearch serve --flag-name` option, an environment
variable `CLIPSEARCH_FLAG_NAME`, and a documented default (`clipsearch serve --help`, and the
table in docs/SETTINGS.md, which a test keeps in sync). Precedence: flag > environment >
default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from clipsearch.defaults import DEFAULT_HOST, DEFAULT_PORT
from clipsearch.server.errors import ConfigurationError
from clipsearch.server.limits import (
    DEVICES,
    GRAPH_OPTIMIZATION_LEVELS,
    INDEX_TYPES,
    METRICS,
    is_milvus_lite,
)

ENV_PREFIX = "CLIPSEARCH_"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _setting(
    default: Any, help: str, choices: tuple[str, ...] | None = None, repeatable: bool = False
) -> Any:
    """A field; `repeatable`: its flag may be given several times, the values joined by
    commas (the environment variable takes the comma list)."""
    return field(
        default=default, metadata={"help": help, "choices": choices, "repeatable": repeatable}
    )


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve, as given: `NAME=DIR`, or a bare `DIR` (named by its manifest)."""

    name: str  # "" = the name in the bundle's manifest
    path: str  # "" = the committed demo model
    entry: str  # as given, for the settings of this model alone (`Settings.for_model`)


def parse_model_entry(entry: str) -> ModelSpec:
    """`NAME=DIR` or `DIR`; ConfigurationError if NAME is not a valid model name."""
    entry = entry.strip()
    name, sep, path = entry.partition("=")
    if not sep:
        return ModelSpec("", entry, entry)
    if not MODEL_NAME.fullmatch(name) or not path:
        raise ConfigurationError(
            f"model {entry!r}: give NAME=DIR or DIR, NAME being letters, digits, '_', '.' "
            "or '-' (at most 64)"
        )
    return ModelSpec(name, path, entry)


@dataclass(frozen=True)
class Settings:
    # --- network
    host: str = _setting(DEFAULT_HOST, "address to listen on (0.0.0.0 for all interfaces)")
    port: int = _setting(DEFAULT_PORT, "port to listen on (0 picks a free one)")
    max_message_mb: int = _setting(64, "largest gRPC message accepted or sent, MiB")
    grace_period_s: float = _setting(10.0, "on SIGINT/SIGTERM, time given to calls in flight")
    auth_token: str = _setting("", "if set, every call needs 'authorization: Bearer TOKEN'")
    # --- security and limits (docs/SECURITY.md)
    auth_token_file: str = _setting(
        "", "read the bearer token from this file (not visible in ps or /proc, unlike argv)"
    )
    tls_cert: str = _setting("", "server certificate chain, PEM file (with --tls-key: TLS)")
    tls_key: str = _setting("", "private key of --tls-cert, PEM file")
    tls_client_ca: str = _setting(
        "", "CA bundle, PEM file: clients must present a certificate it signed (mutual TLS)"
    )
    max_collections: int = _setting(
        64,
        "most collections the store may hold (each costs threads and memory in Milvus Lite "
        "and a writer here); creating one more fails with FAILED_PRECONDITION",
    )

    # --- model
    model: str = _setting(
        "",
        "model bundle to serve: DIR (named by its manifest) or NAME=DIR; repeat the flag to "
        "serve several, the first being the default (default: the committed demo model)",
        repeatable=True,
    )
    models: str = _setting(
        "",
        "models to serve as a comma list NAME=DIR,NAME=DIR (the first is the default): the "
        "same as repeating --model; give one or the other",
    )
    precision: str = _setting(
        "auto",
        "precision variant: auto = fp16 on CUDA where the bundle has it; on CPU int8-static "
        "where the bundle has one that passed the batch-invariance gate, else fp32; int8 "
        "(dynamic, CPU) is about as fast but its vectors vary slightly with their batch-mates",
        ("auto", "fp32", "fp16", "int8", "int8-static"),
    )
    device: str = _setting(
        "cpu", "execution providers in order of preference: cpu, cuda, tensorrt (comma list)"
    )
    allow_cpu_fallback: bool = _setting(
        False, "run on CPU when an asked-for GPU provider is missing (else refuse to start)"
    )
    intra_op_threads: int = _setting(0, "ONNX Runtime threads per inference (0: one per core)")
    graph_optimization: str = _setting(
        "all", "ONNX Runtime graph optimization level", GRAPH_OPTIMIZATION_LEVELS
    )
    warmup: bool = _setting(True, "run each tower at a few batch sizes before serving")

    # --- batching
    max_batch_size: int = _setting(32, "largest inference batch per tower")
    max_wait_ms: float = _setting(
        2.0,
        "longest a batch waits for more items after its first (only while recent batches "
        "held several items: a lone query after a quiet spell runs at once)",
    )
    max_queue: int = _setting(4096, "items queued per tower before RESOURCE_EXHAUSTED")
    inference_workers: int = _setting(1, "batches run at once per tower (2+ helps on GPUs)")
    preprocess_threads: int = _setting(0, "image decode threads (0: one per core, at most 8)")
    bulk_max_wait_ms: float = _setting(
        500.0, "bulk (ingest) items older than this are served like interactive ones"
    )

    # --- request limits
    max_text_bytes: int = _setting(
        16384, "largest text accepted (Encode, text Search, captions), UTF-8 bytes"
    )
    max_inputs_per_request: int = _setting(
        1024, "most texts and images in one Encode request (a smaller max_queue lowers it)"
    )

    # --- images
    max_image_bytes: int = _setting(20 * 1024 * 1024, "largest encoded image accepted, bytes")
    max_image_pixels: int = _setting(50_000_000, "largest image accepted, width x height")
    fast_jpeg: bool = _setting(True, "decode large JPEGs at reduced size (DCT scaling)")

    # --- text
    strict_text_length: bool = _setting(
        False,
        "refuse texts longer than the model's context (INVALID_ARGUMENT) instead of "
        "truncating them (kept start, end token kept, flagged per item)",
    )

    # --- store
    milvus_uri: str = _setting(
        "./clipsearch.db",
        "a local path (Milvus Lite, embedded), http://host:19530 (Milvus server/cluster), or "
        "memory: (in the server's memory, lost when it stops: for trials and benchmarks)",
    )
    milvus_token: str = _setting("", "Milvus token or user:password (never logged)")
    index_type: str = _setting("HNSW", "vector index of new collections", INDEX_TYPES)
    metric: str = _setting("IP", "similarity of new collections", METRICS)
    index_params: str = _setting(
        "", 'index build params as JSON, e.g. {"M": 16, "efConstruction": 200}'
    )
    search_params: str = _setting("", 'default search params as JSON, e.g. {"ef": 64}')
    default_collection: str = _setting("images", "collection used when a call names none")

    # --- ingest
    ingest_window: int = _setting(128, "items of one ingest stream being processed at once")
    ingest_write_batch: int = _setting(64, "items written to Milvus in one upsert")
    ingest_write_wait_ms: float = _setting(20.0, "longest an encoded item waits for its upsert")
    ingest_write_concurrency: int = _setting(
        2, "upserts of one collection in flight at once on a Milvus server (Lite: always 1)"
    )

    # --- observability
    metrics_port: int = _setting(
        0, "serve Prometheus metrics on this port at /metrics, on --host (0: no metrics)"
    )
    otel: bool = _setting(
        False,
        "OpenTelemetry traces, a span per call with its stages, sent by OTLP/gRPC to "
        "$OTEL_EXPORTER_OTLP_ENDPOINT (needs the [otel] extra)",
    )
    priority_queue: bool = _setting(
        True,
        "batchers serve search and encode items before ingest items (off: first come, "
        "first served; for comparisons)",
    )

    # --- store faults and health
    store_retry_s: float = _setting(
        30.0,
        "while the vector store is unreachable, ingest holds a write and retries it this long "
        "(exponential backoff), then ends the stream UNAVAILABLE for the client to resume",
    )
    store_probe_s: float = _setting(
        5.0,
        "seconds between health probes of the vector store: health is NOT_SERVING while it is "
        "unreachable or out of disk, SERVING again once it answers and its collections are "
        "loaded (0: no probe)",
    )

    log_level: str = _setting("info", "logging level", ("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name}={getattr(self, f.name)!r} is not one of {choices}")
        positive = (
            "max_message_mb", "max_batch_size", "max_queue", "inference_workers",
            "max_image_bytes", "max_image_pixels", "ingest_window", "ingest_write_batch",
            "max_text_bytes", "max_inputs_per_request",
            "ingest_write_concurrency",
        )  # fmt: skip
        problems += [f"{n} must be > 0" for n in positive if getattr(self, n) <= 0]
        non_negative = (
            "port", "intra_op_threads", "preprocess_threads", "max_wait_ms", "metrics_port",
        )  # fmt: skip
        problems += [f"{n} must be >= 0" for n in non_negative if getattr(self, n) < 0]
        problems += self._security_problems()
        if self.metrics_port and self.metrics_port == self.port:
            problems.append(f"metrics_port={self.metrics_port} is the gRPC port")
        problems += self._model_problems()
        faults = ("store_retry_s", "store_probe_s")
        problems += [f"{n} must be >= 0" for n in faults if getattr(self, n) < 0]
        unknown = [p for p in self.providers if p not in DEVICES]
        if unknown or not self.providers:
            problems.append(f"device={self.device!r}: use {', '.join(DEVICES)} (comma list)")
        if problems:
            raise ConfigurationError("invalid settings: " + "; ".join(problems))

    def _security_problems(self) -> list[str]:
        problems = []
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together (TLS needs both)")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth_token and self.auth_token_file:
            problems.append("give auth_token or auth_token_file, not both")
        if self.max_collections <= 0:
            problems.append("max_collections must be > 0")
        return problems

    def _model_problems(self) -> list[str]:
        if self.model and self.models:
            return ["give model or models, not both (they are two spellings of one list)"]
        try:
            specs = self.model_specs
        except ConfigurationError as exc:
            return [str(exc)]
        names = [spec.name for spec in specs if spec.name]
        twice = sorted({name for name in names if names.count(name) > 1})
        return [f"model name {name!r} is given twice" for name in twice]

    @property
    def model_specs(self) -> tuple[ModelSpec, ...]:
        """The models to serve, the default first (the demo model when none is given)."""
        entries = [e for e in (self.model or self.models).split(",") if e.strip()]
        if not entries:
            return (ModelSpec("", "", ""),)
        return tuple(parse_model_entry(entry) for entry in entries)

    def for_model(self, spec: ModelSpec) -> Settings:
        """These settings, serving `spec` alone (what a per-model encoder factory gets)."""
        return self.replace(model=spec.entry, models="")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(p.strip().lower() for p in self.device.split(",") if p.strip())

    @property
    def inputs_per_request(self) -> int:
        """The Encode maximum in force: a request larger than the queue could never fit."""
        return min(self.max_inputs_per_request, self.max_queue)

    @property
    def uses_milvus_lite(self) -> bool:
        return is_milvus_lite(self.milvus_uri)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # --- sources -----------------------------------------------------------------------

    @classmethod
    def env_name(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(cls.env_name(f.name))
            if raw is not None:
                values[f.name] = _parse(f.name, f.default, raw, source=cls.env_name(f.name))
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.keys() & MODEL_FIELDS:  # the flags name the whole list of models
            for name in MODEL_FIELDS:
                values.pop(name, None)
        values.update(given)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{f.metadata['help']} [env {cls.env_name(f.name)}, default {f.default!r}]"
            if isinstance(f.default, bool):
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
            elif f.metadata.get("repeatable"):
                parser.add_argument(
                    flag, action="append", default=None, help=help_text, metavar=f.name.upper()
                )
            else:
                parser.add_argument(
                    flag,
                    type=type(f.default),
                    default=None,
                    choices=f.metadata.get("choices"),
                    help=help_text,
                    metavar=f.name.upper() if not f.metadata.get("choices") else None,
                )

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        given = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        for name, value in given.items():
            if isinstance(value, list):  # a repeatable flag
                given[name] = ",".join(value)
        return cls.from_env(env, **given)

    @classmethod
    def documentation(cls) -> str:
        """The Markdown table of docs/SETTINGS.md."""
        lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            default = repr(f.default)
            lines.append(
                f"| `--{f.name.replace('_', '-')}` | `{cls.env_name(f.name)}` | `{default}` "
                f"| {f.metadata['help']} |"
            )
        return "\n".join(lines) + "\n"


MODEL_FIELDS = frozenset({"model", "models"})


def _parse(name: str, default: Any, raw: str, source: str) -> Any:
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected true/false")
        return type(default)(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{source}={raw!r} is not a valid {name}: {exc}") from None
