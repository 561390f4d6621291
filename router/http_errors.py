"""Errors as OpenAI error bodies: ApiError, and the mapping from parse, validation and engine errors."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import EngineError, InvalidRequest, QueueFullError
from .openai_protocol import ProtocolError, error_body

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
_NESTED_FIELDS = {"role", "content", "name", "include_usage"}
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
          413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or _TYPES.get(status, "BadRequestError")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.status, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def retry_later(status: int, message: str) -> ApiError:
    return ApiError(status, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def from_validation(errors: list[dict[str, Any]]) -> ApiError:
    """The first pydantic error as a 400 naming the field."""
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, ProtocolError):
        return ApiError(400, str(exc), param=exc.param)
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc else None
    for p in loc[1:]:
        if isinstance(p, int):
            param += f"[{p}]"
        elif p in _NESTED_FIELDS:
            param += f".{p}"
        else:
            break  # a union member tag, not a field
    msg = err.get("msg", "invalid value")
    if loc and loc[0] == "prompt" and err.get("type") not in ("missing", "too_long"):
        msg = "must be a string, a list of token ids, or a one-element list of either"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def from_protocol(e: ProtocolError) -> ApiError:
    return ApiError(400, str(e), param=e.param)


def from_engine(e: Exception) -> ApiError:
    """An engine admission error (or anything else raised while serving) as an ApiError."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, QueueFullError):
        return retry_later(429, f"The server is overloaded ({e}); retry later")
    if isinstance(e, EngineError):
        return retry_later(e.status, f"The engine is not running: {e}")
    log.exception("request failed", exc_info=e)
    return ApiError(500, f"Internal error: {type(e).__name__}: {e}")


def install_handlers(app: FastAPI) -> None:
    """Every error the app can raise answers in the OpenAI error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation(list(e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=e)
        return ApiError(500, f"Internal error: {type(e).__name__}").response()
