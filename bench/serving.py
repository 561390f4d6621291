"""Serving benchmark: the expertmesh server (continuous batching, expert workers) under a load test, vs HF
transformers `generate` over the same prompts in static batches (each batch runs to its longest output)."""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from .datasets import SampleRequest
from .offline import load_hf


@dataclass(frozen=True)
class ServingBench:
    model_dir: str
    workers: int = 4
    dtype: str = "bfloat16"
    num_prompts: int = 128
    input_len: int = 128
    output_min: int = 16
    output_max: int = 128
    max_concurrency: int = 32
    hf_batch: int = 32
    hf: bool = True
    router_cpus: int = 2
    seed: int = 0


def make_requests(cfg: ServingBench, vocab_size: int) -> list[SampleRequest]:
    rng = random.Random(cfg.seed)
    return [SampleRequest(prompt=[rng.randrange(3, vocab_size) for _ in range(cfg.input_len)],
                          prompt_len=cfg.input_len, output_len=rng.randint(cfg.output_min, cfg.output_max))
            for _ in range(cfg.num_prompts)]


def run_ours(cfg: ServingBench, requests: list[SampleRequest]) -> dict:
    import ray

    from cluster.deployment import ClusterConfig, ExpertCluster
    from router.scheduler import EngineConfig
    from router.server import ServerConfig

    from .loadtest import LoadTestConfig, run_load_test

    engine = EngineConfig(kv_cache_bytes=1 << 30, max_num_seqs=cfg.max_concurrency, max_num_batched_tokens=512)
    with ExpertCluster(ClusterConfig(cfg.model_dir, cfg.workers, cfg.dtype, router_cpus=cfg.router_cpus)) as c:
        url = ray.get(c.router.start_server.remote(ServerConfig(port=0, engine=engine)))
        lt = run_load_test(LoadTestConfig(base_url=url, num_prompts=len(requests), max_concurrency=cfg.max_concurrency,
                                          progress=False, seed=cfg.seed), requests=requests)
    r = lt.result
    return {"system": f"expertmesh ({cfg.workers} workers)", "completed": r["completed"], "failed": r["failed"],
            "output_tok_s": r["output_throughput"], "duration_s": r["duration"],
            **{f"{m}_{p}_ms": r[f"{p}_{m}_ms"] for m in ("ttft", "itl") for p in ("median", "p99")}}


class _StepClock:
    """HF streamer that timestamps each generation step (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(cfg: ServingBench, requests: list[SampleRequest]) -> dict:
    """Static batches in arrival order; all requests arrive at t=0, so later batches queue."""
    torch.set_num_threads(cfg.router_cpus)
    model = load_hf(cfg.model_dir, cfg.dtype)
    ttft, itl = [], []
    t0 = time.perf_counter()
    for start in range(0, len(requests), cfg.hf_batch):
        batch = requests[start:start + cfg.hf_batch]
        ids = torch.tensor([r.prompt for r in batch])
        longest = max(r.output_len for r in batch)
        clock = _StepClock()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=0, streamer=clock)
        steps = clock.times[1:]  # token i of every request in the batch arrived at steps[i]
        for r in batch:
            ttft.append(steps[0] - t0)
            itl.extend(b - a for a, b in zip(steps[:r.output_len - 1], steps[1:r.output_len], strict=True))
    duration = time.perf_counter() - t0
    useful = sum(r.output_len for r in requests)
    return {"system": f"HF transformers (static batches of {cfg.hf_batch})", "completed": len(requests),
            "failed": 0, "output_tok_s": useful / duration, "duration_s": duration,
            "ttft_median_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * _p99(ttft),
            "itl_median_ms": 1000 * statistics.median(itl), "itl_p99_ms": 1000 * _p99(itl)}


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def run_serving_bench(cfg: ServingBench, log=print) -> list[dict]:
    from model.config import MixtralConfig

    requests = make_requests(cfg, MixtralConfig.from_file(cfg.model_dir).vocab_size)
    rows = [run_ours(cfg, requests)]
    log(rows[-1])
    if cfg.hf:
        rows.append(run_hf(cfg, requests))
        log(rows[-1])
        rows[0]["vs_hf"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    return rows
