"""Vector index settings: index type, metric, build and search params, with defaults."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clipsearch.server.errors import ConfigurationError, InvalidInput
from clipsearch.server.limits import INDEX_TYPES, MAX_RESULT_WINDOW, METRICS

DEFAULT_BUILD_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 128},
    "HNSW": {"M": 16, "efConstruction": 200},
    "AUTOINDEX": {},
}
DEFAULT_SEARCH_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {},
    "IVF_FLAT": {"nprobe": 16},
    "HNSW": {"ef": 64},
    "AUTOINDEX": {},
}
# Search params Milvus reads as integers; any other param is passed on as a float.
INTEGER_PARAMS = frozenset({"ef", "nprobe", "level", "search_k", "max_empty_result_buckets"})


@dataclass(frozen=True)
class IndexConfig:
    """How new collections are indexed, and the default search params for that index."""

    index_type: str = "HNSW"
    metric: str = "IP"
    build_params: Mapping[str, Any] = field(default_factory=dict)
    search_params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ConfigurationError(f"index type {self.index_type!r} is not one of {INDEX_TYPES}")
        if self.metric not in METRICS:
            raise ConfigurationError(f"metric {self.metric!r} is not one of {METRICS}")

    @classmethod
    def from_strings(
        cls, index_type: str, metric: str, build_params_json: str, search_params_json: str
    ) -> IndexConfig:
        """From the settings' strings; empty JSON means the index type's defaults."""
        return cls(
            index_type=index_type,
            metric=metric,
            build_params={
                **DEFAULT_BUILD_PARAMS.get(index_type, {}),
                **_json_object(build_params_json, "index_params"),
            },
            search_params={
                **DEFAULT_SEARCH_PARAMS.get(index_type, {}),
                **_json_object(search_params_json, "search_params"),
            },
        )

    @classmethod
    def defaults_for(cls, index_type: str, metric: str) -> IndexConfig:
        return cls.from_strings(index_type, metric, "", "")

    @classmethod
    def observed(cls, index_type: str, metric: str) -> IndexConfig:
        """An existing collection's index as Milvus describes it. An index type made by
        other means (e.g. IVF_SQ8) gets no default search params: Milvus's own apply."""
        if index_type in INDEX_TYPES:
            return cls.defaults_for(index_type, metric)
        return cls(index_type="FLAT", metric=metric)


def _json_object(text: str, setting: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{setting} is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        raise ConfigurationError(f"{setting} must be a JSON object of numbers, got {text!r}")
    return value


def search_params(
    config: IndexConfig, top_k: int, offset: int, overrides: Mapping[str, float] | None
) -> dict[str, Any]:
    """The `params` of one search: the index's defaults, then the caller's overrides.

    HNSW's ef is raised to at least top_k + offset, which Milvus requires (a smaller ef
    would be refused, not just less accurate)."""
    params: dict[str, Any] = dict(config.search_params)
    for key, value in (overrides or {}).items():
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise InvalidInput(f"search param {key!r} must be a finite number, got {value!r}")
        params[key] = value
    for key, value in params.items():
        if key in INTEGER_PARAMS:
            if value != int(value) or value < 1:
                raise InvalidInput(f"search param {key!r} must be a positive integer, got {value}")
            params[key] = int(value)
    if config.index_type == "HNSW":
        params["ef"] = max(int(params.get("ef", 0)), top_k + offset)
    return params


def check_window(top_k: int, offset: int) -> None:
    if top_k < 1:
        raise InvalidInput(f"top_k must be at least 1, got {top_k}")
    if offset < 0:
        raise InvalidInput(f"offset must not be negative, got {offset}")
    if top_k + offset > MAX_RESULT_WINDOW:
        raise InvalidInput(
            f"top_k + offset must be at most {MAX_RESULT_WINDOW}, got {top_k} + {offset}"
        )
