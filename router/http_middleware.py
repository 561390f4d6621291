"""ASGI middleware of the OpenAI server: request ids, the API key, body size and concurrency limits."""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from .http_errors import ApiError, retry_later

REQUEST_ID_HEADER = "x-request-id"
_OPEN_PATHS = ("/health", "/metrics", "/version")  # probes and scrapes are never limited


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


class RequestIdMiddleware:
    """Echo X-Request-Id (or a fresh one) on every response and expose it to handlers via scope state."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = (_header(scope, REQUEST_ID_HEADER.encode()) or "").strip()[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _authorized(scope: dict[str, Any], api_key: str) -> bool:
    auth = _header(scope, b"authorization") or ""
    return hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode())


def _unauthorized() -> JSONResponse:
    return JSONResponse({"error": "Unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class AuthMiddleware:
    """With an api key, /v1/*, /tokenize and /detokenize need `Authorization: Bearer KEY` (else 401); /health
    and /metrics stay open."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (self.api_key and scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"].startswith(PROTECTED_PREFIXES) and not _authorized(scope, self.api_key)):
            return await _unauthorized()(scope, receive, send)
        await self.app(scope, receive, send)


class RequireApiKey:
    """Wraps one ASGI app (the /metrics app, with --metrics-auth): every HTTP request needs the api key."""

    def __init__(self, app: Any, api_key: str):
        if not api_key:
            raise ValueError("--metrics-auth: needs an API key ($EXPERTMESH_API_KEY or --api-key-file)")
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _authorized(scope, self.api_key):
            return await _unauthorized()(scope, receive, send)
        await self.app(scope, receive, send)


DRAIN_FACTOR = 16  # an oversized body up to this many times the limit is read and dropped before the 413


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class LimitsMiddleware:
    """413 for a declared Content-Length over max_bytes (the handlers also count the bytes they read: chunked
    bodies declare none); 503 + Retry-After beyond max_concurrent requests in flight (streams count until they
    end). Probes and scrapes are exempt."""

    def __init__(self, app: Any, max_bytes: int, max_concurrent: int):
        self.app, self.max_bytes, self.max_concurrent = app, max_bytes, max_concurrent
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and not length.isdigit():
            err = ApiError(400, f"Invalid Content-Length header: {length[:40]!r}")
            return await err.response()(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            if int(length) <= DRAIN_FACTOR * self.max_bytes:
                await _drain(receive)  # so that the client, still sending, reads the answer
            err = ApiError(413, f"The request body is {length} bytes; the limit is {self.max_bytes} bytes "
                                "(--max-request-bytes)")
            return await err.response()(scope, receive, send)
        if self.in_flight >= self.max_concurrent:
            err = retry_later(503, f"Too many concurrent requests ({self.max_concurrent}, "
                                   "--max-concurrent-requests); retry later")
            return await err.response()(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
