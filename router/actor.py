"""Thin Ray actor around the attention-plus-router: the dense model with the remote expert backend."""

from __future__ import annotations

import dataclasses
import os
import time

import ray
import torch

from model.config import MixtralConfig
from model.generation import generate
from model.mixtral import Mixtral
from model.sampling import SamplingParams

from .remote_experts import RemoteExperts, RoutingTable
from .server import ServerConfig


def torch_threads_from_ray() -> int:
    """Torch threads = this actor's Ray CPU share (at least 1)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


class RouterActor:
    def __init__(self, model_dir: str, table: RoutingTable, dtype: str = "float32", timeout_s: float = 30.0):
        torch_threads_from_ray()
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.model_dir = model_dir
        num_experts = MixtralConfig.from_file(model_dir).num_local_experts
        self.backend = RemoteExperts(table, num_experts=num_experts, timeout_s=timeout_s)
        self.model = Mixtral.from_pretrained(model_dir, dtype=dtype, device=self.device, experts=self.backend)
        self._health = (0.0, True)
        self.server = None

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": self.device, "node_id": ray.get_runtime_context().get_node_id(),
                "torch_threads": torch.get_num_threads(), "workers": self.backend.table.addresses(),
                "metrics_url": self.metrics_url()}

    def metrics_url(self) -> str | None:
        """The server's /metrics as other nodes reach it; None while no server with metrics runs."""
        if self.server is None or self.server.metrics is None:
            return None
        host = self.server.cfg.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        return f"http://{host}:{self.server.port}/metrics"

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 return_logits: bool = False) -> tuple[list[list[int]], list[torch.Tensor]]:
        return generate(self.model, prompts, params, return_logits=return_logits)

    def dispatch_stats(self) -> dict:
        s = self.backend.stats
        return {"rpcs": s.rpcs, "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
                "tokens": s.tokens, "wall_seconds": s.wall_seconds, "expert_seconds": s.expert_seconds,
                "per_worker_tokens": dict(s.per_worker_tokens), "per_worker_rpcs": dict(s.per_worker_rpcs)}

    def record_dispatches(self, on: bool) -> None:
        """Keep a log of (layer, worker) per Dispatch, for tests that count RPCs per step."""
        self._log: list[tuple[int, int, str]] = []
        self._recording = on
        if not getattr(self, "_log_hooked", False):  # chain: a metrics hook keeps running
            prev = self.backend.on_dispatch

            def hook(layer, addr, *rest):
                if self._recording:
                    self._log.append((self.backend.step, layer, addr))
                if prev is not None:
                    prev(layer, addr, *rest)

            self.backend.on_dispatch, self._log_hooked = hook, True

    def dispatch_log(self) -> list[tuple[int, int, str]]:
        return list(getattr(self, "_log", []))

    def start_server(self, cfg: ServerConfig) -> str:
        """Start the engine and the OpenAI HTTP API in this actor; returns the URL."""
        from .server import RouterServer

        self.server = RouterServer(self.model, self.model_dir, cfg, health_check=self.experts_healthy)
        return self.server.url

    def experts_healthy(self) -> bool:
        """False while any expert worker is unreachable (probed at most once a second)."""
        now = time.monotonic()
        if now - self._health[0] > 1.0:
            self._health = (now, not self.backend.unreachable(timeout_s=1.0))
        return self._health[1]

    def engine_stats(self) -> dict:
        return dataclasses.asdict(self.server.engine.stats())

    def stop_server(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.drain_and_stop()
            self.server = None

    def shutdown(self) -> None:
        self.stop_server()
        self.backend.close()
