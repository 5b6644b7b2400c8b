"""Domain errors of the serving path.

Every error a caller can cause or observe is a subclass of `ClipsearchError` carrying an
`ErrorCode`. The codes are named after gRPC status codes; the one translation to
`grpc.StatusCode` lives in `clipsearch.server.interceptors`, so the encoder, batcher and store
stay transport-agnostic.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class ClipsearchError(Exception):
    """Base of all domain errors; `str(err)` is the message shown to the client."""

    code: ErrorCode = ErrorCode.INTERNAL


# --- bad input (INVALID_ARGUMENT) -------------------------------------------------------


class InvalidInput(ClipsearchError):
    code = ErrorCode.INVALID_ARGUMENT


class ImageError(InvalidInput):
    """An image could not be turned into pixels."""


class EmptyImage(ImageError):
    pass


class UndecodableImage(ImageError):
    """Corrupt, truncated or not an image at all."""


class UnsupportedImageFormat(ImageError):
    """A real image, in a format or mode the server does not accept."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit (decompression bombs end here, before full decode)."""


class InvalidFilter(InvalidInput):
    pass


# --- state ------------------------------------------------------------------------------


class NotFound(ClipsearchError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(ClipsearchError):
    code = ErrorCode.ALREADY_EXISTS


class ModelMismatch(ClipsearchError):
    """A collection was built with another model than the one being served."""

    code = ErrorCode.FAILED_PRECONDITION


class TooManyCollections(ClipsearchError):
    """Creating one more collection would pass `max_collections`. FAILED_PRECONDITION, not
    RESOURCE_EXHAUSTED: clients retry the latter, and no retry helps until a collection is
    dropped or the limit raised."""

    code = ErrorCode.FAILED_PRECONDITION


# --- load and availability --------------------------------------------------------------


class Overloaded(ClipsearchError):
    """The batcher queue is full: the caller should back off and retry."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ClipsearchError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(ClipsearchError):
    code = ErrorCode.CANCELLED


class Unavailable(ClipsearchError):
    """A dependency (the vector store) is down, or the server is shutting down."""

    code = ErrorCode.UNAVAILABLE


class Unauthenticated(ClipsearchError):
    code = ErrorCode.UNAUTHENTICATED


# --- configuration (raised at start-up, never per request) ------------------------------


class ConfigurationError(ClipsearchError):
    """Settings or the model bundle are unusable: the server refuses to start."""

    code = ErrorCode.FAILED_PRECONDITION


class BundleError(ConfigurationError):
    pass


class ProviderUnavailable(ConfigurationError):
    """An execution provider was asked for and cannot run here."""


class InferenceError(ClipsearchError):
    """ONNX Runtime failed on a batch; only that batch's items see it."""

    code = ErrorCode.INTERNAL
