"""Where the router's tokens go: per (layer, expert) from the gate's decisions, per worker from Dispatch RPCs.

Hot path: one index_add_ per forward into an [L, E] int64 tensor on the model's device (no host sync), and a
few dict updates per Dispatch RPC (the RemoteExperts on_dispatch hook). Everything else happens at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .histograms import DISPATCH_BUCKETS, Histogram, MetricsConfig, histogram_family


class _CountingExperts:
    """An expert backend wrapper that adds each forward's routing decisions to tokens [L, E]: it keeps the
    layers' expert ids and counts them all at the last layer (4 tensor ops a step, none of them syncing).
    Per thread, so forwards running side by side (RouterActor.generate beside the engine) do not mix."""

    def __init__(self, inner: Any, tokens: torch.Tensor):
        self.inner, self.tokens = inner, tokens
        L, E = tokens.shape
        self._row_offsets = torch.arange(L, device=tokens.device).view(L, 1) * E  # rows of tokens.view(-1)
        self._local = threading.local()
        self._add_lock = threading.Lock()  # in-place adds from two threads could lose counts

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        local = self._local
        if layer == 0:
            local.pending = []  # a new forward (drops what a failed one left)
        pending = local.pending
        pending.append(expert_ids)
        if len(pending) == self.tokens.shape[0]:
            flat = (torch.stack(pending).view(len(pending), -1) + self._row_offsets).view(-1)
            with self._add_lock:
                self.tokens.view(-1).index_add_(0, flat, torch.ones_like(flat))
            local.pending = []
        return self.inner(layer, hidden, expert_ids, weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ExpertMetrics:
    """Collector of the expert-load series; counts from attach until detach."""

    def __init__(self, model: Any, cfg: MetricsConfig):
        self.cfg = cfg
        self.num_layers, self.num_experts = model.cfg.num_hidden_layers, model.cfg.num_local_experts
        self.model, self.backend = model, model.experts
        self.tokens: torch.Tensor | None = None  # [L, E] (token, slot) pairs routed to each expert
        if cfg.expert_metrics:
            self.tokens = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=model.device)
            model.experts = _CountingExperts(self.backend, self.tokens)
        # written by the dispatch loop thread only, read (copied) at scrape time
        self.layer_worker_tokens: dict[tuple[int, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.bytes = {"sent": 0, "received": 0}
        self._snapshots: deque[tuple[float, dict[tuple[int, str], int]]] = deque([(time.monotonic(), {})])
        self._lock = threading.Lock()  # guards _snapshots against concurrent scrapes
        self._attached = True
        self._hook = None
        if hasattr(self.backend, "on_dispatch"):
            prev = self.backend.on_dispatch

            def hook(*args: Any) -> None:
                if prev is not None:
                    prev(*args)
                if self._attached:
                    self._on_dispatch(*args)

            self._hook = self.backend.on_dispatch = hook

    def detach(self) -> None:
        self._attached = False
        if isinstance(self.model.experts, _CountingExperts) and self.model.experts.tokens is self.tokens:
            self.model.experts = self.backend
        # a hook chained on top of ours (record_dispatches) keeps ours, which is now inert

    def _on_dispatch(self, layer: int, addr: str, experts: list[int], counts: list[int], seconds: float,
                     sent: int, received: int) -> None:
        key = (layer, addr)
        self.layer_worker_tokens[key] = self.layer_worker_tokens.get(key, 0) + sum(counts)
        h = self.durations.get(addr)
        if h is None:
            h = self.durations[addr] = Histogram(DISPATCH_BUCKETS)
        h.observe(seconds)
        self.bytes["sent"] += sent
        self.bytes["received"] += received

    # ---- scrape time ---------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        L, E = self.num_layers, self.num_experts
        table = getattr(self.backend, "table", None)  # RoutingTable of RemoteExperts; none in-process
        if self.tokens is not None:
            fam = CounterMetricFamily("expertmesh_expert_tokens_total", "Tokens (token, slot pairs) the router "
                                      "sent to each logical expert.", labels=["layer", "expert"])
            for layer, row in enumerate(self.tokens.tolist()):
                for e, n in enumerate(row):
                    fam.add_metric([str(layer), str(e)], n)
            yield fam
            if table is not None:
                fam = GaugeMetricFamily("expertmesh_expert_replicas", "Workers hosting each logical expert.",
                                        labels=["layer", "expert"])
                for layer in range(L):
                    for e in range(E):
                        fam.add_metric([str(layer), str(e)], len(table.replicas.get((layer, e), ())))
                yield fam
        if table is None:
            return
        name = table.name_of
        cur = dict(self.layer_worker_tokens)
        per_worker: dict[str, int] = dict.fromkeys(table.addresses(), 0)
        for (_, addr), n in cur.items():
            per_worker[addr] = per_worker.get(addr, 0) + n
        fam = CounterMetricFamily("expertmesh_worker_dispatch_tokens_total", "Token rows sent to each worker.",
                                  labels=["worker"])
        for addr, n in sorted(per_worker.items()):
            fam.add_metric([name(addr)], n)
        yield fam
        yield histogram_family("expertmesh_dispatch_duration_seconds", "One Dispatch RPC, as the router sees it.",
                               ["worker"], [([name(a)], h) for a, h in sorted(dict(self.durations).items())])
        fam = CounterMetricFamily("expertmesh_dispatch_bytes_total", "Serialized Dispatch messages.",
                                  labels=["direction"])
        for direction, n in list(self.bytes.items()):
            fam.add_metric([direction], n)
        yield fam
        fam = GaugeMetricFamily("expertmesh_layer_load_imbalance", "Max over mean worker load of a layer, over "
                                f"the last {self.cfg.imbalance_window_s:g} s or more (1 = balanced or idle).",
                                labels=["layer"])
        base = self._window_base(cur)
        for layer in range(L):
            serving = {table.worker_of(layer, e) for e in range(E) if table.replicas.get((layer, e))}
            loads = [cur.get((layer, a), 0) - base.get((layer, a), 0) for a in serving]
            total = sum(loads)
            fam.add_metric([str(layer)], max(loads) * len(loads) / total if total > 0 else 1.0)
        yield fam

    def _window_base(self, cur: dict[tuple[int, str], int]) -> dict[tuple[int, str], int]:
        """Counts at the newest snapshot at least the window old (else the oldest); records `cur`."""
        now = time.monotonic()
        with self._lock:
            snaps = self._snapshots
            while len(snaps) > 1 and snaps[1][0] <= now - self.cfg.imbalance_window_s:
                snaps.popleft()
            base = snaps[0][1]
            snaps.append((now, cur))
            return base
