"""The router's side of live expert re-placement: the load counters the placement controller reads, its requests
and reports, `GET /v1/admin/placement`, `POST /v1/admin/rebalance` and the placement metrics.

The controller (cluster/rebalance.py) runs in the `serve` driver, not here: every tick it calls the router
actor's `placement_poll` (load counters, engine queue, pending rebalance requests) and then `placement_report`
(its status and the results of what it did). So POST /v1/admin/rebalance only queues a request: it answers 202
with the request id, or with `{"wait_s": S}` in the body waits up to S seconds for the result (200 when done,
still 202 when not). Both routes sit under /v1, behind the API key.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .expert_metrics import DispatchLoad
from .forward_tracker import ForwardTracker
from .handlers import read_body
from .http_errors import ApiError

CONTROLLER_STALE_S = 30.0  # no poll for this long: no controller is running
MAX_WAIT_S = 300.0
KEEP_RESULTS = 32
MAX_BODY_BYTES = 64 * 1024


def table_json(table: Any) -> dict:
    """The live routing table: workers (name, address, pairs hosted) and per layer the replicas of each expert."""
    reps = table.replicas
    num_layers = 1 + max((layer for layer, _ in reps), default=-1)
    num_experts = 1 + max((e for _, e in reps), default=-1)
    hosted: dict[str, int] = {}
    for addrs in reps.values():
        for a in addrs:
            hosted[a] = hosted.get(a, 0) + 1
    return {"workers": [{"worker": table.name_of(a), "address": a, "pairs": hosted.get(a, 0)}
                        for a in table.addresses()],
            "replicas": [[[table.name_of(a) for a in reps.get((layer, e), ())] for e in range(num_experts)]
                         for layer in range(num_layers)]}


class PlacementAdmin:
    """Thread-safe state shared by the HTTP handlers (event loop), the controller's polls (Ray actor threads)
    and the metrics collector (scrapes)."""

    def __init__(self, backend: Any, load: DispatchLoad, forwards: ForwardTracker):
        self.backend, self.load, self.forwards = backend, load, forwards
        self._lock = threading.Lock()
        self._next_id = 1
        self._pending: list[dict] = []
        self._results: OrderedDict[int, dict] = OrderedDict()
        self.last_result: dict | None = None
        self.status: dict = {}  # the controller's last report
        self.last_poll: float | None = None
        self.rebalances_total = 0

    # ---- the controller's side (through the router actor) ----------------------------------------------------

    def poll(self, engine: Any = None) -> dict:
        """Counters and requests for the controller's tick; takes the pending requests."""
        stats = engine.stats() if engine is not None else None
        with self._lock:
            self.last_poll = time.monotonic()
            requests, self._pending = self._pending, []
        return {"load": self.load.snapshot(), "dispatch_wall_seconds": self.backend.stats.wall_seconds,
                "step": self.backend.step, "requests": requests, "old_table_forwards": self.forwards.old_in_flight(),
                "engine": None if stats is None else {"num_waiting": stats.num_waiting,
                                                      "num_running": stats.num_running,
                                                      "last_step_seconds": stats.last_step_seconds}}

    def report(self, status: dict, results: list[dict]) -> None:
        """The controller's status, and the results of rebalances it ran (each counted when it moved experts)."""
        with self._lock:
            self.status = dict(status)
            for r in results:
                if r.get("status") == "done":
                    self.rebalances_total += 1
                if r.get("id") is not None:
                    self._results[r["id"]] = r
                self.last_result = r
                while len(self._results) > KEEP_RESULTS:
                    self._results.popitem(last=False)

    # ---- HTTP ------------------------------------------------------------------------------------------------

    def controller_alive(self) -> bool:
        return self.last_poll is not None and time.monotonic() - self.last_poll < CONTROLLER_STALE_S

    async def get(self) -> JSONResponse:
        """GET /v1/admin/placement."""
        with self._lock:
            body = {"controller_running": self.controller_alive(), "controller": dict(self.status),
                    "rebalances_total": self.rebalances_total,
                    "last_rebalance": self.last_result,
                    "pending_requests": [r["id"] for r in self._pending],
                    "old_table_forwards": self.forwards.old_in_flight()}
        return JSONResponse({**table_json(self.backend.table), **body})

    async def post_rebalance(self, request: Request) -> JSONResponse:
        """POST /v1/admin/rebalance, body optional: {"wait_s": seconds to wait for the result, 0..300}."""
        raw = await read_body(request, MAX_BODY_BYTES)
        wait_s = 0.0
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise ApiError(400, f"Invalid JSON body: {e}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object")
            unknown = sorted(set(body) - {"wait_s"})
            if unknown:
                raise ApiError(400, f"{unknown[0]}: unknown field (only wait_s)", param=unknown[0])
            wait_s = body.get("wait_s", 0)
            if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= MAX_WAIT_S:
                raise ApiError(400, f"wait_s: must be a number of seconds in [0, {MAX_WAIT_S:g}], got {wait_s!r}",
                               param="wait_s")
        if not self.controller_alive():
            raise ApiError(503, "no placement controller is running (expertmesh serve runs one)")
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._pending.append({"id": rid, "requested_at": time.time()})
        deadline = time.monotonic() + float(wait_s)
        while True:
            with self._lock:
                result = self._results.get(rid)
            if result is not None:
                return JSONResponse(result)
            if time.monotonic() >= deadline:
                return JSONResponse({"id": rid, "status": "queued", "message": "the placement controller runs it "
                                     "on its next tick; GET /v1/admin/placement shows the result"}, status_code=202)
            await asyncio.sleep(0.05)

    # ---- metrics ---------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily("expertmesh_rebalances", "Rebalances that changed the expert placement.")
        fam.add_metric([], self.rebalances_total)
        yield fam
        fam = GaugeMetricFamily("expertmesh_workers", "Expert workers in the live routing table.")
        fam.add_metric([], len(self.backend.table.addresses()))
        yield fam
