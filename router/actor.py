"""Thin Ray actor around the attention-plus-router: the dense model with the remote expert backend."""

from __future__ import annotations

import dataclasses
import os
import time

import ray
import torch

from model.config import MixtralConfig
from model.generation import generate
from model.sampling import SamplingParams
from protos.security import DataPlaneSecurity

from .admin_placement import PlacementAdmin
from .expert_metrics import DispatchLoad
from .forward_tracker import ForwardTracker, TrackedMixtral
from .remote_experts import RemoteExperts, RoutingTable
from .server import ServerConfig


def torch_threads_from_ray() -> int:
    """Torch threads = this actor's Ray CPU share (at least 1)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


class RouterActor:
    def __init__(self, model_dir: str, table: RoutingTable, dtype: str = "float32", timeout_s: float = 30.0,
                 security: DataPlaneSecurity | None = None):
        torch_threads_from_ray()
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.model_dir = model_dir
        model_cfg = MixtralConfig.from_file(model_dir)
        num_experts = model_cfg.num_local_experts
        self.backend = RemoteExperts(table, num_experts=num_experts, timeout_s=timeout_s, security=security)
        self.load = DispatchLoad(model_cfg.num_hidden_layers, num_experts)  # the placement controller reads it
        self.backend.add_listener(self.load)
        self.forwards = ForwardTracker()  # a rebalance drops experts once no forward on the old table runs
        self.placement = PlacementAdmin(self.backend, self.load, self.forwards)
        self.model = TrackedMixtral.from_pretrained(model_dir, dtype=dtype, device=self.device, experts=self.backend)
        self.model.tracker = self.forwards
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

    def generate(self, prompts: list[list[int]], params: SamplingParams, return_logits: bool = False,
                 overlap: bool = False) -> tuple[list[list[int]], list[torch.Tensor]]:
        return generate(self.model, prompts, params, return_logits=return_logits, overlap=overlap)

    def dispatch_stats(self) -> dict:
        s = self.backend.stats
        return {"rpcs": s.rpcs, "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
                "tokens": s.tokens, "wall_seconds": s.wall_seconds, "expert_seconds": s.expert_seconds,
                "per_worker_tokens": dict(s.per_worker_tokens), "per_worker_rpcs": dict(s.per_worker_rpcs)}

    def record_dispatches(self, on: bool) -> None:
        """Keep a log of (layer, worker) per Dispatch, for tests that count RPCs per step."""
        self._log: list[tuple[int, int, str]] = []
        self._recording = on
        if not getattr(self, "_log_hooked", False):
            def hook(layer, addr, *rest):
                if self._recording:
                    self._log.append((self.backend.step, layer, addr))

            self.backend.add_listener(hook)
            self._log_hooked = True

    def dispatch_log(self) -> list[tuple[int, int, str]]:
        return list(getattr(self, "_log", []))

    def start_server(self, cfg: ServerConfig) -> str:
        """Start the engine and the OpenAI HTTP API in this actor; returns the URL."""
        from .server import RouterServer
        from .service_discovery import PrometheusTargets

        self.server = RouterServer(self.model, self.model_dir, cfg, health_check=self.experts_healthy,
                                   prometheus_targets=PrometheusTargets(self.backend, self.metrics_url),
                                   placement_admin=self.placement)
        if self.server.metrics is not None:
            self.server.metrics.registry.register(self.placement)
        self._push_restarts()
        return self.server.url

    # ---- live re-placement: called by the placement controller (cluster/rebalance.py) ------------------------

    def placement_poll(self) -> dict:
        """Dispatch load counters, the engine's queue and pending POST /v1/admin/rebalance requests."""
        return self.placement.poll(self.server.engine if self.server is not None else None)

    def placement_report(self, status: dict, results: list[dict]) -> None:
        self.placement.report(status, results)

    def wait_old_forwards(self, timeout_s: float) -> bool:
        """True once no forward that started before the latest table swap runs (waits up to timeout_s)."""
        return self.forwards.wait_old_done(timeout_s)

    def experts_healthy(self) -> bool:
        """False while any expert worker is marked down or unreachable (probed at most once a second)."""
        now = time.monotonic()
        if now - self._health[0] > 1.0:
            self._health = (now, not self.backend.unreachable(timeout_s=1.0))
        return self._health[1] and not self.backend.plane.down

    # ---- failover: called by the cluster controller ----------------------------------------------------------

    def swap_table(self, table: RoutingTable, worker_restarts: dict[str, int] | None = None) -> None:
        """Route every forward from the next one on by `table` (new addresses connected first)."""
        self.backend.swap_table(table)
        self.forwards.swapped()
        self._health = (0.0, True)  # probe the new table on the next /health
        if worker_restarts is not None:
            self._worker_restarts = dict(worker_restarts)
        self._push_restarts()

    def supervise(self, lease_s: float) -> dict:
        """The controller's heartbeat: it repairs the expert plane for the next lease_s seconds. Returns the
        plane's state (addresses marked down, table generation)."""
        self.backend.plane.supervise(lease_s)
        return self.backend.plane.snapshot()

    def give_up(self, reason: str | None) -> None:
        """The controller cannot repair the plane now (held steps fail with `reason`); None takes it back."""
        self.backend.plane.give_up(reason)

    def _push_restarts(self) -> None:
        metrics = self.server.metrics if self.server is not None else None
        if metrics is not None:
            metrics.worker_restarts.update(getattr(self, "_worker_restarts", {}))

    def engine_stats(self) -> dict:
        return dataclasses.asdict(self.server.engine.stats())

    def stop_server(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.drain_and_stop()
            self.server = None

    def shutdown(self) -> None:
        self.stop_server()
        self.backend.close()
