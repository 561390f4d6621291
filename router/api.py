"""The OpenAI-compatible app (vLLM conventions): routes wired onto the handlers in router.handlers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.routing import Mount

from .engine_client import EngineClient
from .handlers import (
    AdminHandler,
    ApiContext,
    ApiLimits,
    ChatHandler,
    CompletionsHandler,
    HealthHandler,
    ModelsHandler,
    version,
)
from .http_errors import install_handlers
from .http_middleware import AuthMiddleware, LimitsMiddleware, RequestIdMiddleware

__all__ = ["ApiLimits", "build_app"]


def build_app(engine: EngineClient, tokenizer: Any, served_model_name: str, api_key: str | None = None,
              health_check: Callable[[], bool] | None = None, metrics_app: Any = None,
              limits: ApiLimits | None = None) -> FastAPI:
    """/v1/completions, /v1/chat/completions, /v1/models, /v1/admin/engine, /health, /version and (given)
    /metrics. Every error answers in the OpenAI error shape; /v1/* needs the api key when one is set."""
    limits = limits or ApiLimits()
    limits.validate()
    ctx = ApiContext(engine, tokenizer, served_model_name, limits, health_check)
    app = FastAPI(title="expertmesh", openapi_url=None, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_api_route("/v1/completions", CompletionsHandler(ctx).handle, methods=["POST"])
    app.add_api_route("/v1/chat/completions", ChatHandler(ctx).handle, methods=["POST"])
    app.add_api_route("/v1/models", ModelsHandler(ctx).handle, methods=["GET"])
    app.add_api_route("/v1/admin/engine", AdminHandler(ctx).handle, methods=["GET"])
    app.add_api_route("/health", HealthHandler(ctx).handle, methods=["GET"])
    app.add_api_route("/version", version, methods=["GET"])
    if metrics_app is not None:
        route = Mount("/metrics", metrics_app)
        route.path_regex = re.compile("^/metrics(?P<path>.*)$")  # serve /metrics without a 307 to /metrics/
        app.router.routes.append(route)
    app.add_middleware(LimitsMiddleware, max_bytes=limits.max_request_bytes,
                       max_concurrent=limits.max_concurrent_requests)
    app.add_middleware(AuthMiddleware, api_key=api_key)
    app.add_middleware(RequestIdMiddleware)
    return app
