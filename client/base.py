"""What `Client` and `AsyncClient` share: configuration, deadlines, auth, call preparation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipsearch.client import convert
from clipsearch.client.channel import DEFAULT_ADDRESS, ChannelConfig, TlsConfig, call_metadata
from clipsearch.client.convert import ingest_options
from clipsearch.client.errors import InvalidArgument
from clipsearch.client.ingest import Backoff, IngestState, progress_bar
from clipsearch.client.types import EncodeResult, ImageInput, SearchResult, Target

DEFAULT_TIMEOUT_S = 30.0


class ClientBase:
    """Configuration common to both clients (see `Client` for the arguments)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        tls: TlsConfig | None = None,
        max_message_mb: int = 64,
        retry: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.address = address
        self.timeout = timeout
        self.channel_config = ChannelConfig(
            address=address,
            tls=tls,
            max_message_mb=max_message_mb,
            retry=retry,
            extra_options=tuple(options),
        )
        self._metadata = call_metadata(token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

    def _deadline(self, timeout: float | None) -> float:
        """The per-call timeout: the call's own, else the client's default."""
        return self.timeout if timeout is None else timeout

    def _ingest_state(
        self,
        *,
        collection: str | None,
        create_collection: bool,
        skip_existing: bool,
        progress: bool,
        total: int | None,
        window: int,
        max_attempts: int,
        backoff: Backoff | None,
    ) -> IngestState:
        return IngestState(
            ingest_options(collection, create_collection, skip_existing),
            window=window,
            max_attempts=max_attempts,
            backoff=backoff or Backoff(),
            progress=progress_bar(total) if progress else None,
        )


def profile_description(
    call: str,
    *,
    text: str | None,
    image: ImageInput | None,
    vector: Any,
    like: str | None,
    target: str,
    top_k: int,
) -> str:
    """A one-line description of the profiled call, for the report's header."""
    if text is not None:
        query = f"text {text!r}"
    elif isinstance(image, bytes):
        query = f"image ({len(image)} bytes)"
    elif image is not None:
        query = f"image {str(image)!r}"
    elif vector is not None:
        query = "vector"
    else:
        query = f"like {like!r}"
    if call == "encode":
        return f"Encode {query}"
    return f"Search {query} -> {target}, top_k={top_k}"


def profiled_rpc(
    *,
    call: str,
    text: str | None,
    image: ImageInput | None,
    vector: np.ndarray | Sequence[float] | None,
    like: str | None,
    target: Target,
    top_k: int,
    filter: str,
    collection: str | None,
) -> convert.Rpc[Any, SearchResult | EncodeResult]:
    """The one call a profile repeats (built once: an image file is read once)."""
    if call == "encode":
        if text is not None and image is None:
            return convert.texts_rpc([text])
        if image is not None and text is None:
            return convert.images_rpc([image])
        raise InvalidArgument("profiling an encode needs exactly one of text or image")
    if call != "search":
        raise ValueError(f"call must be 'search' or 'encode', got {call!r}")
    request = convert.search_request(
        text,
        image=image,
        vector=vector,
        like=like,
        target=target,
        top_k=top_k,
        filter=filter,
        collection=collection,
    )
    return convert.search_rpc(request)
