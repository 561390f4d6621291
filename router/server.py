"""The router's serving stack in one process: engine loop thread + uvicorn HTTP thread over the model."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import uvicorn

from model.mixtral import Mixtral
from model.tokenizer import Tokenizer
from protos.addresses import advertised_host

from .api import ApiLimits, build_app
from .engine import AsyncEngine, Engine
from .http_middleware import RequireApiKey
from .metrics import MetricsConfig, RouterMetrics
from .scheduler import EngineConfig


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    api_key: str | None = field(default=None, repr=False)
    metrics_auth: bool = False  # /metrics needs the api key too
    served_model_name: str | None = None  # default: the checkpoint directory's name
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_cache_bytes=512 * 1024 * 1024))
    drain_timeout_s: float = 60.0
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: ApiLimits = field(default_factory=ApiLimits)

    def __post_init__(self):
        if self.metrics_auth and not self.api_key:
            raise ValueError("--metrics-auth: needs an API key ($EXPERTMESH_API_KEY or --api-key-file)")


class HttpThread:
    """uvicorn on its own thread and event loop; `stop` lets in-flight responses finish."""

    def __init__(self, app, host: str, port: int, graceful_s: float = 30.0, log_level: str = "warning",
                 max_connections: int | None = None):
        # max_connections: uvicorn's own backstop (a plain 503) above the app's OpenAI-shaped request limit
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=graceful_s, lifespan="off",
                                                    limit_concurrency=max_connections))
        self.thread = threading.Thread(target=self.server.run, name="expertmesh-http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> int:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("HTTP server did not start (is the port in use?)")
            time.sleep(0.02)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


class RouterServer:
    def __init__(self, model: Mixtral, model_dir: str, cfg: ServerConfig, health_check=None, metrics_app=None,
                 prometheus_targets=None, placement_admin=None):
        self.cfg = cfg
        self.metrics = RouterMetrics(cfg.metrics) if cfg.metrics.enabled else None
        self.engine = Engine(model, cfg.engine, metrics=self.metrics)
        self.async_engine = AsyncEngine(self.engine)
        name = cfg.served_model_name or model_dir.rstrip("/").split("/")[-1]
        self.app = build_app(self.async_engine, Tokenizer.from_dir(model_dir), name, api_key=cfg.api_key,
                             health_check=health_check, limits=cfg.limits, prometheus_targets=prometheus_targets,
                             placement_admin=placement_admin,
                             metrics_app=self._metrics_app(metrics_app or (self.metrics and self.metrics.asgi_app())))
        self.http = HttpThread(self.app, cfg.host, cfg.port,
                               max_connections=2 * cfg.limits.max_concurrent_requests + 64)
        try:
            self.port = self.http.start()
        except BaseException:
            self.async_engine.shutdown(drain=False)
            if self.metrics is not None:
                self.metrics.detach()
            raise

    def _metrics_app(self, app):
        return RequireApiKey(app, self.cfg.api_key) if app and self.cfg.metrics_auth else app

    @property
    def url(self) -> str:
        """The URL other machines reach: with host 0.0.0.0, the node's IP (never http://0.0.0.0)."""
        return f"http://{advertised_host(self.cfg.host)}:{self.port}"

    def drain_and_stop(self) -> None:
        """Refuse new requests, finish the in-flight ones, then stop HTTP and the engine loop."""
        self.async_engine.shutdown(drain=True, timeout=self.cfg.drain_timeout_s)
        self.http.stop()
        if self.metrics is not None:
            self.metrics.detach()


