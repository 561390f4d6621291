"""Rebalance benchmark: a skewed checkpoint under load with static placement, with `--redundant-experts` and
with `--autoscale` on top.

Per configuration: start the cluster (and, except static, the serve controller with the rebalancer on its
ticks), run a warm-up load test long enough for the controller to act, then the measured load test. Reported:
output tok/s, median and p99 inter-token latency, failed requests, and the worker imbalance per layer (max /
mean rows per worker of a layer, measured by the router over the measured run), the workers at the end and
the rebalances done.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = ("static", "redundant", "autoscale")


@dataclass(frozen=True)
class RebalanceBench:
    model_dir: str
    workers: int = 4
    redundant_experts: int = 4
    max_workers: int = 6
    interval_s: float = 5.0
    warmup_prompts: int = 160
    num_prompts: int = 240
    input_len: int = 64
    output_len: int = 32
    max_concurrency: int = 16
    max_num_seqs: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name in ("workers", "max_workers", "warmup_prompts", "num_prompts", "input_len", "output_len",
                     "max_concurrency", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_workers < self.workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below workers ({self.workers})")


def skewed_checkpoint(skew: float = 1.2) -> Path:
    """The tiny preset with `--router-skew skew` in the user's cache, written once (atomically)."""
    from cluster.serve_cmd import cache_dir
    from model.random_checkpoint import write_checkpoint

    target = cache_dir() / f"tiny-skew{skew:g}-seed0"
    if not (target / "config.json").exists():
        tmp = cache_dir() / f".{target.name}-{os.getpid()}"
        write_checkpoint(tmp, "tiny", seed=0, router_skew=skew)
        tmp.rename(target)
    return target


def _requests(cfg: RebalanceBench, n: int, vocab: int, seed: int):
    from .datasets import SampleRequest

    rng = random.Random(seed)
    return [SampleRequest(prompt=[rng.randrange(3, vocab) for _ in range(cfg.input_len)], prompt_len=cfg.input_len,
                          output_len=cfg.output_len) for _ in range(n)]


def _imbalance(cluster, a: dict, b: dict) -> list[float]:
    from cluster.rebalance import window_between

    serving: dict[int, set[str]] = {}
    for (layer, _), addrs in cluster.table.replicas.items():
        serving.setdefault(layer, set()).update(addrs)
    return window_between(a, b).worker_imbalance({k: sorted(v) for k, v in serving.items()})


def run_one(cfg: RebalanceBench, config: str, log=print) -> dict:
    import ray

    from cluster.autoscale import AutoscaleConfig
    from cluster.controller import Controller
    from cluster.deployment import ClusterConfig, ExpertCluster
    from cluster.rebalance import RebalanceConfig
    from cluster.rebalance_flags import PlacementSettings, attach
    from model.config import MixtralConfig
    from router.scheduler import EngineConfig
    from router.server import ServerConfig

    from .loadtest import LoadTestConfig, run_load_test

    vocab = MixtralConfig.from_file(cfg.model_dir).vocab_size
    engine = EngineConfig(kv_cache_bytes=256 << 20, max_num_seqs=cfg.max_num_seqs)
    redundant = 0 if config == "static" else cfg.redundant_experts  # as serve: the slots exist from the start
    with ExpertCluster(ClusterConfig(cfg.model_dir, cfg.workers, redundant_experts=redundant)) as cluster:
        url = ray.get(cluster.router.start_server.remote(ServerConfig(port=0, engine=engine)))
        controller = Controller(cluster).start()
        rebalancer = None
        if config != "static":
            autoscale = AutoscaleConfig(min_workers=cfg.workers, max_workers=cfg.max_workers) \
                if config == "autoscale" else None
            rebalancer = attach(controller, cluster, PlacementSettings(
                RebalanceConfig(redundant_experts=cfg.redundant_experts, interval_s=cfg.interval_s), autoscale))
        try:
            lt_cfg = LoadTestConfig(base_url=url, num_prompts=cfg.warmup_prompts, max_concurrency=cfg.max_concurrency,
                                    progress=False, seed=cfg.seed, scrape_metrics=False)
            t0 = time.monotonic()
            run_load_test(lt_cfg, requests=_requests(cfg, cfg.warmup_prompts, vocab, cfg.seed + 1))
            warm_s = time.monotonic() - t0
            before = ray.get(cluster.router.placement_poll.remote())
            lt = run_load_test(LoadTestConfig(base_url=url, num_prompts=cfg.num_prompts,
                                              max_concurrency=cfg.max_concurrency, progress=False, seed=cfg.seed,
                                              scrape_metrics=False),
                               requests=_requests(cfg, cfg.num_prompts, vocab, cfg.seed))
            imbalance = _imbalance(cluster, before, ray.get(cluster.router.placement_poll.remote()))
        finally:
            controller.stop()
        r = lt.result
        history = list(rebalancer.history) if rebalancer is not None else []
        row = {"config": config, "completed": r["completed"], "failed": r["failed"],
               "output_tok_s": round(r["output_throughput"], 2), "itl_median_ms": round(r["median_itl_ms"], 2),
               "itl_p99_ms": round(r["p99_itl_ms"], 2),
               "imbalance_per_layer": " ".join(f"{x:.2f}" for x in imbalance),
               "workers_end": len(cluster.worker_ids()),
               "rebalances": sum(h["status"] == "done" for h in history), "warmup_s": round(warm_s, 1)}
    log(row)
    return row


def run_rebalance_bench(cfg: RebalanceBench, log=print) -> list[dict]:
    """Every configuration on one embedded Ray with room for max_workers (or on the Ray already connected)."""
    import ray

    from cluster.ray_runtime import start_ray

    cfg.validate()
    started = not ray.is_initialized()
    start_ray(None, num_cpus_needed=cfg.max_workers + 1)
    try:
        return [run_one(cfg, config, log) for config in CONFIGS]
    finally:
        if started:
            ray.shutdown()
