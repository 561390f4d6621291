"""Router metrics for Prometheus (vLLM's names with an expertmesh_ prefix), built at scrape time.

The step loop only bumps ints and bucket lists (a histogram observation is one bisect and two adds); the
prometheus_client series are made by collectors when /metrics is scraped, from those and the engine's own
state. Counters only: rates are PromQL's job. Each RouterMetrics has its own CollectorRegistry.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .requests import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP

if TYPE_CHECKING:
    from .engine import Engine
    from .expert_metrics import ExpertMetrics

# vLLM's buckets (v1 loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# ours: a step and one Dispatch RPC are sub-millisecond to seconds
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True  # False: no /metrics, nothing recorded
    expert_metrics: bool = True  # per-(layer, expert) series (layers x experts of each); off for very large models
    imbalance_window_s: float = 10.0  # expertmesh_layer_load_imbalance looks back this far (at least)


class Histogram:
    """A histogram for one writer thread, read by the scraper (a torn read is off by one observation)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: le is inclusive
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        counts, total = list(self.counts), self.sum
        acc, buckets = 0, []
        for bound, n in zip(self.bounds + (math.inf,), counts, strict=True):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        family.add_metric(labels, buckets, total)


def histogram_family(name: str, doc: str, labels: list[str] | None = None,
                     series: Iterable[tuple[list[str], Histogram]] = ()) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels or [])
    for values, h in series:
        h.add_to(family, values)
    return family


class RouterMetrics:
    """The router's registry. The engine calls the recording methods under its lock; `attach` (from Engine)
    registers the collectors and starts counting expert load."""

    def __init__(self, cfg: MetricsConfig | None = None):
        self.cfg = cfg or MetricsConfig()
        self.registry = CollectorRegistry()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.step_seconds = Histogram(STEP_BUCKETS)
        self.step_tokens = Histogram(TOKEN_BUCKETS)
        self.finished = dict.fromkeys((FINISH_STOP, FINISH_LENGTH, FINISH_ABORT), 0)
        self.experts: ExpertMetrics | None = None

    def attach(self, engine: Engine) -> None:
        from .expert_metrics import ExpertMetrics

        self.registry.register(_EngineCollector(engine, self))
        self.experts = ExpertMetrics(engine.model, self.cfg)
        self.registry.register(self.experts)

    def detach(self) -> None:
        """Stop counting expert load (gives the model its own expert backend back)."""
        if self.experts is not None:
            self.experts.detach()

    def asgi_app(self) -> Any:
        return make_asgi_app(self.registry)

    # ---- recording (hot path) ------------------------------------------------------------------------------

    def first_token(self, m: dict[str, float], now: float) -> None:
        self.ttft.observe(now - m["arrival"])
        m["last_token"] = now

    def next_token(self, m: dict[str, float], now: float) -> None:
        self.itl.observe(now - m["last_token"])
        m["last_token"] = now

    def request_finished(self, m: dict[str, float], reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.e2e.observe(m["finished"] - m["arrival"])
        if "first_scheduled" in m:
            self.queue.observe(m["first_scheduled"] - m["arrival"])

    def step(self, seconds: float, tokens: int) -> None:
        self.step_seconds.observe(seconds)
        self.step_tokens.observe(tokens)


class _EngineCollector:
    def __init__(self, engine: Engine, m: RouterMetrics):
        self.engine, self.m = engine, m

    def collect(self) -> Iterator[Metric]:
        s, m = self.engine.stats(), self.m
        yield GaugeMetricFamily("expertmesh_num_requests_running", "Requests in the running batch.",
                                value=s.num_running)
        yield GaugeMetricFamily("expertmesh_num_requests_waiting", "Requests waiting to be scheduled.",
                                value=s.num_waiting)
        yield GaugeMetricFamily("expertmesh_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (1 = full).",
                                value=s.kv_usage)
        yield CounterMetricFamily("expertmesh_num_preemptions_total", "Preempted (to be recomputed) sequences.",
                                  value=s.num_preemptions)
        yield CounterMetricFamily("expertmesh_prompt_tokens_total", "Prompt tokens of requests that got a first "
                                  "token.", value=s.prompt_tokens_total)
        yield CounterMetricFamily("expertmesh_generation_tokens_total", "Generated (sampled) tokens.",
                                  value=s.generation_tokens_total)
        success = CounterMetricFamily("expertmesh_request_success_total", "Finished requests by finish reason.",
                                      labels=["finished_reason"])
        for reason, n in list(m.finished.items()):
            success.add_metric([reason], n)
        yield success
        for name, doc, h in (
                ("time_to_first_token_seconds", "Arrival to first token.", m.ttft),
                ("inter_token_latency_seconds", "Time between consecutive tokens of a request.", m.itl),
                ("e2e_request_latency_seconds", "Arrival to finish.", m.e2e),
                ("request_queue_time_seconds", "Arrival to first scheduled.", m.queue),
                ("step_duration_seconds", "One engine step: schedule, forward, sample.", m.step_seconds),
                ("step_batch_tokens", "New tokens in one step's batch.", m.step_tokens)):
            yield histogram_family(f"expertmesh_{name}", doc, series=[([], h)])
