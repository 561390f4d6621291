"""Router metrics for Prometheus (vLLM's names with an expertmesh_ prefix), built at scrape time.

The step loop only bumps ints and bucket lists (a histogram observation is one bisect and two adds); the
prometheus_client series are made by collectors when /metrics is scraped, from those and the engine's own
state. Counters only: rates are PromQL's job. Each RouterMetrics has its own CollectorRegistry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .expert_metrics import ExpertMetrics
from .histograms import (  # noqa: F401 - re-exported: the buckets and config are part of this module's API
    DISPATCH_BUCKETS,
    ITL_BUCKETS,
    RECOVERY_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    STEP_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    MetricsConfig,
    histogram_family,
)
from .requests import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, EngineStats


class MeteredEngine(Protocol):
    """What the metrics read from an engine: its stats and its model (whose expert backend they wrap)."""

    model: Any

    def stats(self) -> EngineStats: ...


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
        self.step_retries = 0  # retries of steps held for the expert plane
        self.recovery = Histogram(RECOVERY_BUCKETS)  # expert plane failure to the held step's success
        self.worker_restarts: dict[str, int] = {}  # worker id -> replacements, set by the cluster controller
        self.experts: ExpertMetrics | None = None

    def attach(self, engine: MeteredEngine) -> None:
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

    def step_retry(self) -> None:
        self.step_retries += 1

    def recovered(self, seconds: float) -> None:
        self.recovery.observe(seconds)


class _EngineCollector:
    def __init__(self, engine: MeteredEngine, m: RouterMetrics):
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
        yield CounterMetricFamily("expertmesh_failed_forwards_total", "Forwards that raised (each is retried, then "
                                  "bisected so that only the request at fault fails).", value=s.failed_steps_total)
        yield GaugeMetricFamily("expertmesh_engine_recovering", "1 while a failed forward is being retried.",
                                value=float(s.recovering))
        yield CounterMetricFamily("expertmesh_step_retries_total", "Retries of steps held while the expert plane "
                                  "recovered from a dead or hung worker.", value=m.step_retries)
        restarts = CounterMetricFamily("expertmesh_worker_restarts_total", "Expert workers replaced after they "
                                       "died or hung, by worker id.", labels=["worker"])
        for worker, n in sorted(dict(m.worker_restarts).items()):
            restarts.add_metric([worker], n)
        yield restarts
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
                ("step_batch_tokens", "New tokens in one step's batch.", m.step_tokens),
                ("recovery_seconds", "Expert plane failure to the next successful step.", m.recovery)):
            yield histogram_family(f"expertmesh_{name}", doc, series=[([], h)])
