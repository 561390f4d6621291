"""The failover bench: a load test with and without an expert worker killed every `kill_every_s`, and the time
from a kill to the next token of 8 open streams (the longest pause between two tokens across the kill), by
replacement and with a live replica.

One cluster, the serve's controller running as in `serve`. The load test rows run `minutes` each at a fixed
request rate; "kills, replacement" has one replica per expert (the controller starts a new worker), "kills,
live replica" first adds one worker per existing worker hosting the same experts (two replicas each: the
router re-routes the dead one's rows within the same forward, then the controller replaces it).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FailoverBench:
    model_dir: str
    workers: int = 2
    minutes: float = 2.0  # per load-test row
    kill_every_s: float = 20.0
    request_rate: float = 4.0
    max_concurrency: int = 16
    input_len: int = 64
    output_len: int = 32
    dispatch_timeout_s: float = 10.0
    resume_streams: int = 8  # streams open during a timed kill
    resume_kills: int = 3  # timed kills per mode (median and max reported)


def run_failover_bench(cfg: FailoverBench, log: Callable[[str], None]) -> list[dict]:
    import ray

    from cluster.controller import Controller, ControllerConfig
    from cluster.deployment import ClusterConfig, ExpertCluster
    from cluster.ray_runtime import start_ray
    from router.scheduler import EngineConfig
    from router.server import ServerConfig

    from .fault_injection import WorkerKiller
    from .loadtest import LoadTestConfig, run_load_test

    start_ray(num_cpus_needed=2 * cfg.workers + 1)  # room for the second replicas and a replacement
    rows: list[dict] = []
    with ExpertCluster(ClusterConfig(cfg.model_dir, cfg.workers, dispatch_timeout_s=cfg.dispatch_timeout_s)) as c:
        url = ray.get(c.router.start_server.remote(ServerConfig(port=0, engine=EngineConfig(
            kv_cache_bytes=256 << 20))))
        controller = Controller(c, ControllerConfig(hung_after_s=cfg.dispatch_timeout_s)).start()
        try:
            def load_row(name: str, kill: bool) -> None:
                n = max(1, int(cfg.request_rate * cfg.minutes * 60))
                killer = WorkerKiller(cfg.kill_every_s).start() if kill else None
                restarts = controller.replacements
                try:
                    lt = run_load_test(LoadTestConfig(
                        base_url=url, num_prompts=n, request_rate=cfg.request_rate,
                        max_concurrency=cfg.max_concurrency, input_len=cfg.input_len, output_len=cfg.output_len,
                        tokenizer=cfg.model_dir, progress=False, scrape_metrics=False))
                finally:
                    if killer is not None:
                        killer.stop()
                r = lt.result
                rows.append({"config": name, "workers": len(c.slots), "completed": r["completed"],
                             "failed": r["failed"], "kills": len(killer.kills) if killer else 0,
                             "replaced": controller.replacements - restarts,
                             "duration_s": round(r["duration"], 1), "output_tok_s": round(r["output_throughput"], 1),
                             "p99_itl_ms": round(r["p99_itl_ms"], 1), "p99_e2el_ms": round(r["p99_e2el_ms"], 1),
                             **({"failure_reasons": r["failure_reasons"]} if r["failure_reasons"] else {})})
                log(json.dumps(rows[-1]))

            def resume_row(name: str) -> None:
                times = [_token_pause(url, c, controller, cfg) for _ in range(cfg.resume_kills)]
                rows.append({"config": name, "workers": len(c.slots), "kills": len(times),
                             "token_pause_median_s": round(statistics.median(times), 2),
                             "token_pause_max_s": round(max(times), 2)})
                log(json.dumps(rows[-1]))

            load_row("no kills", kill=False)
            load_row("kills, replacement", kill=True)
            resume_row("kill -> next token, replacement")
            for wid in list(c.slots):  # a second replica of every expert
                c.add_worker(c.slots[wid].pairs)
            c.push_table()
            load_row("kills, live replica", kill=True)
            resume_row("kill -> next token, live replica")
        finally:
            controller.stop()
    return rows


def _token_pause(url: str, c, controller, cfg: FailoverBench) -> float:
    """Open `resume_streams` greedy streams, kill a random worker through Ray once each has tokens; returns the
    longest pause between two tokens of any stream that ends after the kill: an upper bound of kill to next
    token (the pause began at the stream's last token before the kill)."""
    import httpx

    from .fault_injection import WorkerKiller

    progress = [0] * cfg.resume_streams
    times: list[list[float]] = [[] for _ in range(cfg.resume_streams)]
    done = threading.Event()

    def stream(i: int) -> None:
        body = {"prompt": [5 + i, 17, 3 * i + 1, 42], "max_tokens": 200, "ignore_eos": True, "temperature": 0,
                "stream": True, "model": _model_name(url)}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    progress[i] += 1
                    times[i].append(time.monotonic())
                if done.is_set():
                    break

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(cfg.resume_streams)]
    for t in threads:
        t.start()
    _wait(lambda: min(progress) >= 2, 120)
    replaced = controller.replacements
    at_kill = list(progress)
    killer = WorkerKiller(cfg.kill_every_s, seed=len(at_kill) + replaced)
    killer.kill_one()
    t0 = time.monotonic()
    _wait(lambda: controller.replacements > replaced, 120)  # the plane is whole again before the next kill
    _wait(lambda: all(p >= q + 4 for p, q in zip(progress, at_kill, strict=True)), 120)
    done.set()
    for t in threads:
        t.join(60)
    return max(b - a for ts in times for a, b in zip(ts, ts[1:], strict=False) if b > t0)


def _model_name(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def _wait(cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"failover bench: condition not met within {timeout_s} s")
        time.sleep(0.01)
