"""A worker's own Prometheus endpoint: its WorkerStats, read at scrape time, on a port of its own."""

from __future__ import annotations

import math
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .expert_worker import COMPUTE_BUCKETS, ExpertWorker


class WorkerCollector:
    """expertmesh_worker_* series of one worker, every one labelled worker=<worker id>."""

    def __init__(self, worker: ExpertWorker, expert_metrics: bool = True):
        self.worker, self.expert_metrics = worker, expert_metrics

    def collect(self) -> Iterator[Metric]:
        stats, wid = self.worker.stats, self.worker.worker_id
        if self.expert_metrics:
            fam = CounterMetricFamily("expertmesh_worker_expert_tokens_total", "Token rows this worker computed "
                                      "per expert.", labels=["worker", "layer", "expert"])
            tokens = dict(stats.tokens)
            for layer, e in self.worker.pairs:
                fam.add_metric([wid, str(layer), str(e)], tokens.get((layer, e), 0))
            yield fam
        fam = CounterMetricFamily("expertmesh_worker_requests_total", "Dispatch calls by gRPC status code.",
                                  labels=["worker", "code"])
        for code, n in sorted({"OK": 0, **stats.requests}.items()):
            fam.add_metric([wid, code], n)
        yield fam
        counts, total = list(stats.compute_counts), stats.compute_seconds
        acc, buckets = 0, []
        for bound, n in zip(COMPUTE_BUCKETS + (math.inf,), counts, strict=True):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        fam = HistogramMetricFamily("expertmesh_worker_compute_seconds", "Expert compute of one Dispatch call.",
                                    labels=["worker"])
        fam.add_metric([wid], buckets, total)
        yield fam


def start_metrics_server(worker: ExpertWorker, host: str = "127.0.0.1", port: int = 0,
                         expert_metrics: bool = True) -> tuple[WSGIServer, int]:
    """Serve the worker's metrics over HTTP from a daemon thread; returns the server and its port."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker, expert_metrics))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, server.server_address[1]
