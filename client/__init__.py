"""The clipsearch Python client: `Client` (blocking) and `AsyncClient` (asyncio).

Needs only grpcio, protobuf, numpy and tqdm: `pip install clipsearch` without extras.
Names are imported on first use, so `clipsearch --help` does not pay for gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipsearch.client.aio import AsyncClient
    from clipsearch.client.channel import RetryPolicy, TlsConfig
    from clipsearch.client.client import Client
    from clipsearch.client.errors import (
        Aborted,
        AlreadyExists,
        Cancelled,
        ClipsearchError,
        DataLoss,
        DeadlineExceeded,
        FailedPrecondition,
        Internal,
        InvalidArgument,
        NotFound,
        OutOfRange,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
        Unimplemented,
        Unknown,
    )
    from clipsearch.client.ingest import AsyncIngestStream, Backoff, SyncIngestStream
    from clipsearch.client.profile import Profile
    from clipsearch.client.sources import ItemSource, SourceError, open_source
    from clipsearch.client.types import (
        BatcherStats,
        CollectionInfo,
        CollectionResult,
        Comparison,
        EncodeResult,
        Hit,
        IngestItem,
        IngestResult,
        IngestSummary,
        Item,
        ModelInfo,
        SearchResult,
        ServerInfo,
        Target,
        Timing,
        TowerInfo,
    )

_EXPORTS: dict[str, str] = {
    "Aborted": "clipsearch.client.errors",
    "AlreadyExists": "clipsearch.client.errors",
    "AsyncClient": "clipsearch.client.aio",
    "AsyncIngestStream": "clipsearch.client.ingest",
    "Backoff": "clipsearch.client.ingest",
    "Cancelled": "clipsearch.client.errors",
    "BatcherStats": "clipsearch.client.types",
    "Client": "clipsearch.client.client",
    "ClipsearchError": "clipsearch.client.errors",
    "CollectionInfo": "clipsearch.client.types",
    "DataLoss": "clipsearch.client.errors",
    "DeadlineExceeded": "clipsearch.client.errors",
    "EncodeResult": "clipsearch.client.types",
    "FailedPrecondition": "clipsearch.client.errors",
    "Hit": "clipsearch.client.types",
    "IngestItem": "clipsearch.client.types",
    "IngestResult": "clipsearch.client.types",
    "IngestSummary": "clipsearch.client.types",
    "Internal": "clipsearch.client.errors",
    "InvalidArgument": "clipsearch.client.errors",
    "Item": "clipsearch.client.types",
    "ItemSource": "clipsearch.client.sources",
    "NotFound": "clipsearch.client.errors",
    "OutOfRange": "clipsearch.client.errors",
    "PermissionDenied": "clipsearch.client.errors",
    "Profile": "clipsearch.client.profile",
    "ResourceExhausted": "clipsearch.client.errors",
    "RetryPolicy": "clipsearch.client.channel",
    "CollectionResult": "clipsearch.client.types",
    "Comparison": "clipsearch.client.types",
    "ModelInfo": "clipsearch.client.types",
    "SearchResult": "clipsearch.client.types",
    "ServerInfo": "clipsearch.client.types",
    "SourceError": "clipsearch.client.sources",
    "SyncIngestStream": "clipsearch.client.ingest",
    "Target": "clipsearch.client.types",
    "Timing": "clipsearch.client.types",
    "TlsConfig": "clipsearch.client.channel",
    "TowerInfo": "clipsearch.client.types",
    "Unauthenticated": "clipsearch.client.errors",
    "Unavailable": "clipsearch.client.errors",
    "Unimplemented": "clipsearch.client.errors",
    "Unknown": "clipsearch.client.errors",
    "open_source": "clipsearch.client.sources",
}

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncIngestStream",
    "Backoff",
    "BatcherStats",
    "Cancelled",
    "Client",
    "ClipsearchError",
    "CollectionInfo",
    "CollectionResult",
    "Comparison",
    "DataLoss",
    "DeadlineExceeded",
    "EncodeResult",
    "FailedPrecondition",
    "Hit",
    "IngestItem",
    "IngestResult",
    "IngestSummary",
    "Internal",
    "InvalidArgument",
    "Item",
    "ItemSource",
    "ModelInfo",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Profile",
    "ResourceExhausted",
    "RetryPolicy",
    "SearchResult",
    "ServerInfo",
    "SourceError",
    "SyncIngestStream",
    "Target",
    "Timing",
    "TlsConfig",
    "TowerInfo",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "open_source",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
