"""Histograms recorded on the hot path and turned into Prometheus families at scrape time; the metrics config.

A leaf module: router.metrics and router.expert_metrics both build on it.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# vLLM's buckets (v1 loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# ours: a step and one Dispatch RPC are sub-millisecond to seconds
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
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
