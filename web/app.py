"""The web application: the page, the JSON API, OpenAI-compatible embeddings, one error
mapping; FastAPI generates the OpenAPI description (`/openapi.json`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from clipsearch import __version__
from clipsearch.client import ClipsearchError
from clipsearch.client.errors import error_for
from clipsearch.web import api, embeddings
from clipsearch.web.api import WebState
from clipsearch.web.backends import Backends, WebConfig
from clipsearch.web.errors import HTTP_STATUS, error_body
from clipsearch.web.media import MediaRoot, ThumbnailCache

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("clipsearch.web")
# The page loads nothing but its own files: no CDN, no remote image, no connection elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def create_app(config: WebConfig) -> FastAPI:
    thumbnails = None
    if config.media_root is not None:
        thumbnails = ThumbnailCache(MediaRoot(config.media_root), config.thumbnail_cache_mb << 20)
    backends = Backends(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await backends.close()

    app = FastAPI(
        title="clipsearch web",
        version=__version__,
        description=(
            "The search page's API over one or more clipsearch gRPC servers, and "
            "OpenAI-compatible embeddings. Errors are `{error: {code, message, type}}` with "
            "the gRPC status name as `code`, mapped to HTTP statuses by one table."
        ),
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN; the page ships everything itself.
        docs_url=None,
        redoc_url=None,
    )
    app.state.web = WebState(backends=backends, thumbnails=thumbnails)
    app.include_router(api.router)
    app.include_router(embeddings.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    app.add_exception_handler(ClipsearchError, _clipsearch_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BaseHTTPMiddleware, dispatch=_security_headers)
    return app


def _respond(error: ClipsearchError) -> JSONResponse:
    status, body = error_body(error)
    return JSONResponse(body, status_code=status)


async def _clipsearch_error(request: Request, exc: ClipsearchError) -> JSONResponse:
    return _respond(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}"
        for e in exc.errors()
    )
    return _respond(error_for(grpc.StatusCode.INVALID_ARGUMENT, problems or "invalid request"))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """The framework's own refusals (no such route, method not allowed) in the same shape."""
    code = next(
        (c for c, status in HTTP_STATUS.items() if status == exc.status_code),
        grpc.StatusCode.INVALID_ARGUMENT if exc.status_code < 500 else grpc.StatusCode.INTERNAL,
    )
    _, body = error_body(error_for(code, str(exc.detail)))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _respond(error_for(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"))


async def _security_headers(request: Request, call_next: RequestResponseEndpoint) -> Response:
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    return response
