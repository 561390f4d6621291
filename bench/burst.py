"""Burst benchmark: N times the waiting-queue bound arrives at once, a few rounds in a row.

Per round: how many were served (200) and shed (429 with Retry-After), how fast a shed request was answered,
the admitted requests' end-to-end latency, anything else (should be nothing), and the router's RSS before the
round and after it settled, against the baseline taken after a warm-up round. The server is the cluster's own
on 127.0.0.1; every round is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .soak import LOOPBACK, Probe, _pct


@dataclass(frozen=True)
class BurstBench:
    model_dir: str
    workers: int = 2
    max_waiting: int = 16
    max_num_seqs: int = 8
    factor: int = 20  # each round sends factor * max_waiting requests at once
    rounds: int = 3
    output_len: int = 16
    settle_s: float = 5.0
    timeout_s: float = 120.0

    def validate(self) -> None:
        for name in ("workers", "max_waiting", "max_num_seqs", "factor", "rounds", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")


async def _one(client: httpx.AsyncClient, url: str, i: int, out_len: int) -> tuple[int | str, float, bool]:
    body = {"prompt": [3 + (i * 7 + k) % 200 for k in range(12)], "max_tokens": out_len, "ignore_eos": True}
    t0 = time.perf_counter()
    try:
        r = await client.post(url, json=body)
    except httpx.HTTPError as e:
        return type(e).__name__, time.perf_counter() - t0, False
    ok = r.status_code != 200 or r.json()["usage"]["completion_tokens"] == out_len
    if r.status_code == 429:
        ok = r.headers.get("retry-after") == "1" and r.json()["error"]["type"] == "RateLimitError"
    return r.status_code, time.perf_counter() - t0, ok


async def _round(cfg: BurstBench, url: str, n: int) -> tuple[list[tuple[int | str, float, bool]], float]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_one(client, url, i, cfg.output_len) for i in range(n)))
    return list(res), time.perf_counter() - t0


def run_burst_bench(cfg: BurstBench, log=print) -> list[dict]:
    import ray

    from cluster.deployment import ClusterConfig, ExpertCluster
    from router.scheduler import EngineConfig
    from router.server import ServerConfig

    cfg.validate()
    engine = EngineConfig(kv_cache_bytes=256 << 20, max_num_seqs=cfg.max_num_seqs, max_waiting=cfg.max_waiting)
    rows = []
    with ExpertCluster(ClusterConfig(cfg.model_dir, cfg.workers, "float32", router_cpus=1, worker_cpus=1)) as c:
        base = ray.get(c.router.start_server.remote(ServerConfig(host="127.0.0.1", port=0, engine=engine)))
        if not base.startswith(LOOPBACK):
            raise RuntimeError(f"burst: the server is at {base}, not on 127.0.0.1; refusing to load it")
        probe = Probe(c)
        url = base + "/v1/completions"
        n = cfg.factor * cfg.max_waiting
        log(f"[burst] {Path(cfg.model_dir).name} at {base}: {cfg.rounds} rounds of {n} requests at once "
            f"(max_waiting {cfg.max_waiting}, max_num_seqs {cfg.max_num_seqs})")
        asyncio.run(_round(cfg, url, cfg.max_num_seqs))  # warm-up: compile paths, first allocations
        time.sleep(cfg.settle_s)
        baseline = probe.rss()[0]
        for k in range(1, cfg.rounds + 1):
            before = probe.rss()[0]
            res, took = asyncio.run(_round(cfg, url, n))
            time.sleep(cfg.settle_s)
            stats = ray.get(c.router.engine_stats.remote(), timeout=60)
            after = probe.rss()[0]
            codes = [code for code, _, _ in res]
            rows.append({
                "round": k, "sent": n, "served_200": codes.count(200), "shed_429": codes.count(429),
                "other": sum(1 for c_ in codes if c_ not in (200, 429)), "bad_bodies": sum(not ok for *_, ok in res),
                "shed_p50_ms": _pct([t for code, t, _ in res if code == 429], 50),
                "shed_p99_ms": _pct([t for code, t, _ in res if code == 429], 99),
                "served_p99_ms": _pct([t for code, t, _ in res if code == 200], 99), "round_s": took,
                "rss_baseline_mb": baseline, "rss_before_mb": before, "rss_after_mb": after,
                "rss_vs_baseline_pct": None if not (baseline and after) else 100 * (after / baseline - 1),
                "kv_blocks_used_after": stats["num_kv_blocks"] - stats["num_free_blocks"],
                "running_after": stats["num_running"], "waiting_after": stats["num_waiting"]})
            log(rows[-1])
        ray.get(c.router.stop_server.remote(), timeout=120)
    return rows
