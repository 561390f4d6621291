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
from .tokenize_handlers import DetokenizeHandler, TokenizeHandler

__all__ = ["ApiLimits", "build_app"]


def build_app(engine: EngineClient, tokenizer: Any, served_model_name: str, api_key: str | None = None,
              health_check: Callable[[], bool] | None = None, metrics_app: Any = None,
              limits: ApiLimits | None = None, prometheus_targets: Any = None,
              placement_admin: Any = None) -> FastAPI:
    """/v1/completions, /v1/chat/completions, /v1/models, /v1/admin/engine, /tokenize, /detokenize, /health,
    /version and (given) /metrics. Every error answers in the OpenAI error shape; /v1/*, /tokenize and
    /detokenize need the api key when one is set."""
    limits = limits or ApiLimits()
    limits.validate()
    ctx = ApiContext(engine, tokenizer, served_model_name, limits, health_check)
    app = FastAPI(title="expertmesh", openapi_url=None, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_api_route("/v1/completions", CompletionsHandler(ctx).handle, methods=["POST"])
    app.add_api_route("/v1/chat/completions", ChatHandler(ctx).handle, methods=["POST"])
    app.add_api_route("/v1/models", ModelsHandler(ctx).handle, methods=["GET"])
    app.add_api_route("/v1/admin/engine", AdminHandler(ctx).handle, methods=["GET"])
    app.add_api_route("/tokenize", TokenizeHandler(ctx).handle, methods=["POST"])
    app.add_api_route("/detokenize", DetokenizeHandler(ctx).handle, methods=["POST"])
    if prometheus_targets is not None:  # router.service_discovery.PrometheusTargets: http_sd for Prometheus
        app.add_api_route("/v1/admin/prometheus_targets", prometheus_targets.handle, methods=["GET"])
    if placement_admin is not None:  # router.admin_placement.PlacementAdmin (the remote expert backend only)
        app.add_api_route("/v1/admin/placement", placement_admin.get, methods=["GET"])
        app.add_api_route("/v1/admin/rebalance", placement_admin.post_rebalance, methods=["POST"])
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
