"""Prometheus service discovery: the router's and every expert worker's metrics target, as http_sd / file_sd groups.

`GET /v1/admin/prometheus_targets` answers in Prometheus' http_sd format (a JSON list of {"targets", "labels"}),
built from the router's live routing table on every request, so Prometheus follows workers as they come and go
(failover, replicas). A worker's metrics URL comes from its Info RPC, asked once per address: a restarted worker
has a new address. A worker that has not answered yet is left out until it does; one that stops answering stays
listed while the table names it (Prometheus then shows it `up == 0`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
from fastapi.responses import JSONResponse

ROUTER_JOB, WORKER_JOB = "expertmesh-router", "expertmesh-worker"
INFO_TIMEOUT_S = 2.0


def target_of(url: str) -> str:
    """"http://host:port/metrics" -> "host:port"."""
    return urlsplit(url).netloc


def target_groups(router_metrics_url: str | None, workers: list[tuple[str, str]]) -> list[dict]:
    """One group for the router (when it serves metrics) and one per (worker id, metrics url); the job label
    replaces the scrape job's name, worker labels each worker's series."""
    groups = []
    if router_metrics_url:
        groups.append({"targets": [target_of(router_metrics_url)], "labels": {"job": ROUTER_JOB}})
    for worker_id, url in workers:
        groups.append({"targets": [target_of(url)], "labels": {"job": WORKER_JOB, "worker": worker_id}})
    return groups


class PrometheusTargets:
    """The http_sd target list of a router: `backend` is its RemoteExperts (live `table`, `infos`),
    `router_metrics_url` gives the router's own /metrics URL (None without metrics)."""

    def __init__(self, backend, router_metrics_url: Callable[[], str | None], info_timeout_s: float = INFO_TIMEOUT_S):
        self.backend = backend
        self.router_metrics_url = router_metrics_url
        self.info_timeout_s = info_timeout_s
        self._known: dict[str, tuple[str, str]] = {}  # address -> (worker id, metrics url)
        self._lock = threading.Lock()  # concurrent scrapes of the endpoint ask each worker once

    def groups(self) -> list[dict]:
        table = self.backend.table  # read once: failover may swap it while we work
        addresses = table.addresses()
        with self._lock:
            missing = [a for a in addresses if a not in self._known]
            if missing:
                for addr, info in self.backend.infos(missing, self.info_timeout_s).items():
                    if info.metrics_url:  # empty: that worker runs without a metrics server
                        self._known[addr] = (info.worker_id or table.name_of(addr), info.metrics_url)
            for gone in set(self._known) - set(addresses):
                del self._known[gone]
            workers = sorted(self._known[a] for a in addresses if a in self._known)
        return target_groups(self.router_metrics_url(), workers)

    async def handle(self) -> JSONResponse:
        return JSONResponse(await anyio.to_thread.run_sync(self.groups))
