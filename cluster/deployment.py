"""Bring up expert workers and the router as Ray actors in one placement group, and tear them down."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model.config import MixtralConfig
from router.actor import RouterActor
from router.remote_experts import RoutingTable
from workers.actor import ExpertWorkerActor

from .file_sd import file_sd_groups, write_file_sd
from .placement import PG_STRATEGIES, PlacementError, PlacementPlan, placement_bundles
from .ray_runtime import cluster_has_gpus, start_ray

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300


@dataclass(frozen=True)
class ClusterConfig:
    model_dir: str
    num_workers: int = 2
    dtype: str = "float32"
    placement: str = "contiguous"  # contiguous | round-robin
    pg_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    address: str | None = None  # None: embedded local Ray
    use_gpus: bool | None = None  # None: use GPUs when the cluster has them
    dispatch_timeout_s: float = 30.0
    worker_cpus: int = 1  # Ray CPUs (= torch threads) per expert worker
    router_cpus: int = 1  # Ray CPUs (= torch threads) of the router
    expert_metrics: bool = True  # workers export per-(layer, expert) series


class ExpertCluster:
    """Workers (one placement-group bundle each) and the router actor; `shutdown` leaves nothing behind."""

    def __init__(self, cfg: ClusterConfig):
        if cfg.pg_strategy not in PG_STRATEGIES:
            raise PlacementError(f"placement group strategy: {cfg.pg_strategy!r} is not one of {PG_STRATEGIES}")
        self.cfg = cfg
        model_cfg = MixtralConfig.from_file(cfg.model_dir)
        self.plan = PlacementPlan.build(model_cfg.num_hidden_layers, model_cfg.num_local_experts,
                                        cfg.num_workers, cfg.placement)
        self.started_ray = not ray.is_initialized()
        start_ray(cfg.address, num_cpus_needed=cfg.num_workers * cfg.worker_cpus + cfg.router_cpus)
        self.use_gpus = cluster_has_gpus() if cfg.use_gpus is None else cfg.use_gpus
        bundles = placement_bundles(cfg.num_workers, self.use_gpus, cfg.worker_cpus, cfg.router_cpus)
        self.pg = placement_group(bundles, strategy=cfg.pg_strategy)
        self.workers: list = []
        self.router = None
        self.file_sd_path: Path | None = None
        try:
            ray.get(self.pg.ready(), timeout=READY_TIMEOUT_S)
            self.workers = [self._start_worker(w) for w in range(cfg.num_workers)]
            self.addresses = ray.get([w.address.remote() for w in self.workers], timeout=READY_TIMEOUT_S)
            self.table = RoutingTable.from_placement(self.plan.experts_of_worker, self.addresses,
                                                     model_cfg.num_hidden_layers, self.worker_ids())
            self.router = self._actor(RouterActor, cfg.num_workers).remote(
                cfg.model_dir, self.table, cfg.dtype, cfg.dispatch_timeout_s)
            ray.get(self.router.info.remote(), timeout=READY_TIMEOUT_S)
        except BaseException:  # an error, or Ctrl-C while starting: nothing was served, kill without a drain
            self.shutdown(graceful=False)
            raise

    def _actor(self, cls, bundle: int):
        cpus = self.cfg.router_cpus if bundle == self.cfg.num_workers else self.cfg.worker_cpus
        return ray.remote(cls).options(
            num_cpus=cpus, num_gpus=1 if self.use_gpus else 0, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle))

    def _start_worker(self, w: int):
        return self._actor(ExpertWorkerActor, w).remote(
            self.cfg.model_dir, self.plan.pairs(w), self.cfg.dtype, self.worker_ids()[w],
            expert_metrics=self.cfg.expert_metrics)

    def worker_ids(self) -> list[str]:
        return [f"worker-{w}" for w in range(self.cfg.num_workers)]

    def worker_infos(self) -> list[dict]:
        return ray.get([w.info.remote() for w in self.workers])

    def write_file_sd(self, path: str | Path) -> list[dict]:
        """Write the Prometheus file_sd targets (router HTTP port, each worker's metrics port) to path, and
        keep it current: refresh_file_sd rewrites it when they change. Returns the target groups."""
        self.file_sd_path = Path(path)
        return self.refresh_file_sd()

    def refresh_file_sd(self) -> list[dict]:
        """Rewrite the file_sd file (if one was asked for) when the targets changed; returns the groups."""
        router_url = ray.get(self.router.metrics_url.remote(), timeout=30) if self.router is not None else None
        infos = self.worker_infos()
        groups = file_sd_groups(router_url, [(i["worker_id"], i["metrics_url"]) for i in infos])
        if self.file_sd_path is not None:
            write_file_sd(self.file_sd_path, groups)
        return groups

    def shutdown(self, graceful: bool = True) -> None:
        """Stop gRPC servers gracefully (unless not `graceful`: an actor still starting would first finish
        starting), kill the actors, remove the placement group (and Ray if we started it)."""
        if self.router is not None:
            if graceful:
                _quietly(lambda: ray.get(self.router.shutdown.remote(), timeout=30))
            _quietly(lambda: ray.kill(self.router))
            self.router = None
        for w in self.workers:
            if graceful:
                _quietly(lambda w=w: ray.get(w.stop.remote(), timeout=30))
            _quietly(lambda w=w: ray.kill(w))
        self.workers = []
        if self.pg is not None:
            _quietly(lambda: remove_placement_group(self.pg))
            self.pg = None
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> ExpertCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _quietly(fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - shutdown goes on past a dead actor
        log.warning("shutdown step failed: %s", e)
