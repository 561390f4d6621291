"""What the router's Prometheus metrics cost: engine decode throughput with metrics on and off, in one run.

An in-process model of the bench preset's shape (narrower, so it runs in about a minute on 2 CPU cores) decodes
a batch with the engine, once with metrics on (a scrape every scrape_interval_s, as Prometheus would) and once
off, alternating for `rounds` rounds. Overhead = 1 - median over rounds of (on / off) decode throughput. On a
busy machine whole runs differ more than the effect, so two finer measurements follow: one batch decoded with
metrics switched on and off every other step (on/off/off/on...), comparing median step times; and the hot path's
own cost, the exact recording calls of one decode step timed in a loop, divided by the step time.

    python -m bench.metrics_overhead [--rounds N] [--batch B] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from prometheus_client import generate_latest

from model.experts import ExpertWeights, LocalExperts
from model.mixtral import Mixtral
from model.random_checkpoint import build_config
from model.sampling import SamplingParams
from model.weights import expected_shapes, expert_tensor_name
from router.engine import Engine
from router.expert_metrics import CountingExperts
from router.metrics import MetricsConfig, RouterMetrics
from router.requests import GenerationRequest
from router.scheduler import EngineConfig


@dataclass(frozen=True)
class OverheadConfig:
    hidden_size: int = 256  # the bench preset's layers, experts, heads and vocab; a quarter of its width
    intermediate_size: int = 896
    batch: int = 32  # sequences decoding together
    prompt_len: int = 32
    decode_tokens: int = 48
    rounds: int = 4  # on/off pairs, alternating which goes first; as many step-interleaved batches
    scrape_interval_s: float = 1.0  # with metrics on; Prometheus' default in deploy/ is 5 s
    device: str = "cpu"
    seed: int = 0


def build_model(cfg: OverheadConfig) -> Mixtral:
    """Random weights in memory (no checkpoint on disk), experts in-process."""
    mcfg = build_config("bench", overrides={"hidden_size": cfg.hidden_size,
                                            "intermediate_size": cfg.intermediate_size})
    g = torch.Generator().manual_seed(cfg.seed)
    tensors = {name: (torch.ones(shape) if name.endswith("norm.weight") else
                      torch.randn(shape, generator=g) * 0.02).to(cfg.device)
               for name, shape in expected_shapes(mcfg).items()}
    experts = LocalExperts([[ExpertWeights.from_hf(*(tensors.pop(expert_tensor_name(i, e, w))
                                                     for w in ("w1", "w3", "w2")))
                             for e in range(mcfg.num_local_experts)] for i in range(mcfg.num_hidden_layers)])
    return Mixtral(mcfg, tensors, experts)


def prefilled_engine(model: Mixtral, cfg: OverheadConfig, metrics: RouterMetrics | None) -> Engine:
    """An engine whose batch of `batch` requests has just got its first tokens: decoding is what is left."""
    engine = Engine(model, EngineConfig(num_kv_blocks=cfg.batch * ((cfg.prompt_len + cfg.decode_tokens) // 16 + 2),
                                        max_num_seqs=cfg.batch, max_num_batched_tokens=2048), metrics=metrics)
    params = SamplingParams(max_tokens=cfg.decode_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(cfg.seed)
    for i in range(cfg.batch):
        prompt = tuple(torch.randint(3, model.cfg.vocab_size, (cfg.prompt_len,), generator=g).tolist())
        engine.add_request(GenerationRequest(f"r{i}", prompt, params))
    while engine.stats().generation_tokens_total < cfg.batch:
        engine.step()
    return engine


def decode_throughput(model: Mixtral, cfg: OverheadConfig, metrics: RouterMetrics | None) -> float:
    """Decode tokens/s of one batch: the steps after every sequence got its first token, to the end."""
    engine = prefilled_engine(model, cfg, metrics)
    stop = threading.Event()
    scraper = None
    if metrics is not None:
        scraper = threading.Thread(target=lambda: [generate_latest(metrics.registry)
                                                   for _ in iter(lambda: stop.wait(cfg.scrape_interval_s), True)])
        scraper.start()
    try:
        start, before = time.perf_counter(), engine.stats().generation_tokens_total
        while engine.has_unfinished():
            engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return (engine.stats().generation_tokens_total - before) / (time.perf_counter() - start)
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
        if metrics is not None:
            metrics.detach()


def interleaved_step_seconds(model: Mixtral, cfg: OverheadConfig) -> tuple[list[float], list[float]]:
    """One batch's decode steps with metrics switched on and off in an on/off/off/on pattern: (on, off) seconds.

    Both halves see the same batch and the same background load; only the recording differs.
    """
    metrics = RouterMetrics(MetricsConfig())
    engine = prefilled_engine(model, cfg, metrics)  # prefilled with metrics on: every sequence has its timestamps
    counting, plain = model.experts, metrics.experts.backend
    on: list[float] = []
    off: list[float] = []
    try:
        for i in itertools.count():
            if not engine.has_unfinished():
                break
            enabled = i % 4 in (0, 3)
            engine.metrics, model.experts = (metrics, counting) if enabled else (None, plain)
            start = time.perf_counter()
            engine.step()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            (on if enabled else off).append(time.perf_counter() - start)
    finally:
        engine.metrics, model.experts = metrics, counting
        metrics.detach()
    return on, off


def recording_seconds_per_step(model: Mixtral, cfg: OverheadConfig, steps: int = 2000) -> float:
    """The metrics work the engine adds to one decode step of `batch` sequences, timed in a loop."""
    m = RouterMetrics(MetricsConfig())
    L, E, k = model.cfg.num_hidden_layers, model.cfg.num_local_experts, model.cfg.num_experts_per_tok
    counting = CountingExperts(lambda *args: None, torch.zeros(L, E, dtype=torch.int64, device=model.device))
    ids = torch.randint(0, E, (cfg.batch, k), device=model.device)
    seqs = [{"arrival": 0.0, "last_token": 0.0} for _ in range(cfg.batch)]
    start = time.perf_counter()
    for _ in range(steps):
        now = time.monotonic()
        for layer in range(L):
            counting(layer, None, ids, None)
        for sm in seqs:
            m.next_token(sm, now)
        m.step(0.01, cfg.batch)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def scrape_seconds(model: Mixtral, n: int = 20) -> float:
    """One /metrics scrape of an engine's registry (all L x E expert series included)."""
    metrics = RouterMetrics(MetricsConfig())
    Engine(model, EngineConfig(num_kv_blocks=4), metrics=metrics)
    start = time.perf_counter()
    for _ in range(n):
        generate_latest(metrics.registry)
    metrics.detach()
    return (time.perf_counter() - start) / n


def measure(cfg: OverheadConfig = OverheadConfig()) -> dict:
    model = build_model(cfg)
    decode_throughput(model, cfg, None)  # warm-up
    on, off = [], []
    for r in range(cfg.rounds):
        for enabled in ((True, False) if r % 2 == 0 else (False, True)):
            tps = decode_throughput(model, cfg, RouterMetrics(MetricsConfig()) if enabled else None)
            (on if enabled else off).append(tps)
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    step_on, step_off = [], []
    for _ in range(cfg.rounds):
        a, b = interleaved_step_seconds(model, cfg)
        step_on += a
        step_off += b
    step_s = statistics.median(step_off)
    rec_s = recording_seconds_per_step(model, cfg)
    scrape_s = scrape_seconds(model)
    return {"config": asdict(cfg), "on_tok_s": on, "off_tok_s": off,
            "on_median": statistics.median(on), "off_median": statistics.median(off),
            "on_best": max(on), "off_best": max(off), "overhead": 1.0 - statistics.median(ratios),
            "interleaved_steps": len(step_on) + len(step_off), "step_on_ms": 1e3 * statistics.median(step_on),
            "step_off_ms": 1e3 * step_s, "interleaved_overhead": statistics.median(step_on) / step_s - 1.0,
            "step_ms": 1e3 * step_s, "recording_us_per_step": 1e6 * rec_s, "recording_share": rec_s / step_s,
            "scrape_ms": 1e3 * scrape_s, "scrape_share_5s": scrape_s / 5.0}


def format_table(res: dict) -> str:
    c = res["config"]
    lines = [f"decode throughput, batch {c['batch']}, {c['decode_tokens']} tokens, {c['rounds']} rounds, "
             f"{c['device']}, {torch.get_num_threads()} threads",
             f"{'metrics':<10}{'median tok/s':>14}{'best tok/s':>12}   per round",
             f"{'off':<10}{res['off_median']:>14.1f}{res['off_best']:>12.1f}   "
             + " ".join(f"{x:.1f}" for x in res["off_tok_s"]),
             f"{'on':<10}{res['on_median']:>14.1f}{res['on_best']:>12.1f}   "
             + " ".join(f"{x:.1f}" for x in res["on_tok_s"]),
             f"run-level overhead: {100 * res['overhead']:.2f} % (1 - median of per-round on/off ratios)",
             f"step-interleaved: median decode step {res['step_on_ms']:.2f} ms on, {res['step_off_ms']:.2f} ms off "
             f"({res['interleaved_steps']} steps) = {100 * res['interleaved_overhead']:.2f} % overhead",
             f"hot-path recording: {res['recording_us_per_step']:.1f} us per decode step of "
             f"{res['step_ms']:.1f} ms = {100 * res['recording_share']:.2f} % (target < 2 %)",
             f"scrape: {res['scrape_ms']:.2f} ms each = {100 * res['scrape_share_5s']:.3f} % at a 5 s scrape interval"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__.split("\n")[0])
    d = OverheadConfig()
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    p.add_argument("--device", default=d.device)
    args = p.parse_args(argv)
    cfg = OverheadConfig(rounds=args.rounds, batch=args.batch, decode_tokens=args.decode_tokens, device=args.device)
    print(format_table(measure(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
