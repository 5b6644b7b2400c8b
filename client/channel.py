"""Channel construction shared by `Client` and `AsyncClient`: options, TLS, retries, auth.

Retries are gRPC's own (a `retryPolicy` in the channel's service config), so both clients
retry identically, with exponential backoff and jitter, and only where a retry is safe:
UNAVAILABLE and RESOURCE_EXHAUSTED on the idempotent unary methods. DropCollection is never
retried (a retry after a lost reply would report NOT_FOUND for a drop that succeeded), and
the streams are resumed by the client's own logic (see `clipsearch.client.ingest`), because
a transparent retry cannot replay a stream that has partly been answered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from clipsearch.defaults import DEFAULT_ADDRESS

SERVICE = "clipsearch.v1.ClipSearch"

# Safe to repeat: reads, encodes, and writes whose repetition ends in the same state. If a
# reply is lost after the server acted, the retry reports what it then finds: a
# CreateCollection with exist_ok=False raises AlreadyExists, a Delete counts 0 for the ids
# the first attempt deleted. The state is right either way; use exist_ok=True to be sure.
RETRYABLE_METHODS = (
    "Info",
    "Encode",
    "Search",
    "Get",
    "Count",
    "ListCollections",
    "CreateCollection",
    "Delete",
)
RETRYABLE_STATUS = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy of the idempotent calls (attempts include the first one)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0

    def service_config(self) -> dict[str, Any]:
        return {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": m} for m in RETRYABLE_METHODS],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": f"{self.initial_backoff_s}s",
                        "maxBackoff": f"{self.max_backoff_s}s",
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": list(RETRYABLE_STATUS),
                    },
                }
            ]
        }


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel: PEM bytes. With `certificate_chain` and `private_key`, mutual TLS.

    `root_certificates=None` uses the system roots; `server_name_override` checks the server
    certificate against that name instead of the address's host (testing, IP addresses).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True)
class ChannelConfig:
    """Everything that shapes a channel; `Client` and `AsyncClient` build the same one."""

    address: str = DEFAULT_ADDRESS
    tls: TlsConfig | None = None
    max_message_mb: int = 64
    retry: bool = True
    retry_policy: RetryPolicy = RetryPolicy()
    # gRPC servers refuse pings more often than every 5 minutes by default (GOAWAY
    # "too_many_pings"), so the client pings no more often than that.
    keepalive_time_ms: int = 300_000
    keepalive_timeout_ms: int = 20_000
    keepalive_permit_without_calls: bool = False
    extra_options: Sequence[tuple[str, Any]] = ()

    def options(self) -> list[tuple[str, Any]]:
        max_bytes = self.max_message_mb * 1024 * 1024
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            ("grpc.enable_retries", int(self.retry)),
        ]
        if self.retry:
            options.append(("grpc.service_config", json.dumps(self.retry_policy.service_config())))
        if self.tls is not None and self.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        merged = dict(options)
        merged.update(self.extra_options)  # the caller's options win over ours
        return list(merged.items())

    def sync_channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.address, options=self.options())
        return grpc.secure_channel(self.address, self.tls.credentials(), options=self.options())

    def aio_channel(self) -> aio.Channel:
        if self.tls is None:
            return aio.insecure_channel(self.address, options=self.options())
        return aio.secure_channel(self.address, self.tls.credentials(), options=self.options())


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the bearer token when one is set."""
    return (("authorization", f"Bearer {token}"),) if token else ()
