"""Where the router's tokens go: per (layer, expert) and per worker, from the remote backend's dispatch events.

With the remote backend everything comes from a dispatch listener (RemoteExperts.add_listener): a few list and
dict updates per Dispatch RPC on the dispatch thread. An in-process backend has no dispatch events, so there
CountingExperts wraps it and adds each forward's gate decisions into an [L, E] tensor on the model's device
(one index_add_ per forward, no host sync). Everything else happens at scrape time. DispatchLoad is the same
counting for the placement controller (cluster/rebalance.py), independent of the metrics switch.
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


class CountingExperts:
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


class DispatchLoad:
    """A dispatch listener counting, since creation, rows per (layer, expert) and per (layer, worker address),
    Dispatch seconds per worker (as the router sees them) and RPCs; `snapshot` copies them under a lock."""

    def __init__(self, num_layers: int, num_experts: int):
        self.expert_tokens = [[0] * num_experts for _ in range(num_layers)]
        self.worker_tokens: dict[tuple[int, str], int] = {}
        self.worker_seconds: dict[str, float] = {}
        self.rpcs = 0
        self._lock = threading.Lock()

    def __call__(self, layer: int, addr: str, experts: list[int], counts: list[int], seconds: float,
                 sent: int, received: int) -> None:
        with self._lock:
            row = self.expert_tokens[layer]
            for e, n in zip(experts, counts, strict=True):
                row[e] += n
            key = (layer, addr)
            self.worker_tokens[key] = self.worker_tokens.get(key, 0) + sum(counts)
            self.worker_seconds[addr] = self.worker_seconds.get(addr, 0.0) + seconds
            self.rpcs += 1

    def snapshot(self) -> dict:
        """{"expert_tokens": [L][E], "worker_tokens": [[layer, address, rows]], "worker_seconds": {address: s},
        "rpcs": n, "time": monotonic seconds}; plain data (it crosses Ray)."""
        with self._lock:
            return {"expert_tokens": [list(r) for r in self.expert_tokens],
                    "worker_tokens": [[layer, a, n] for (layer, a), n in self.worker_tokens.items()],
                    "worker_seconds": dict(self.worker_seconds), "rpcs": self.rpcs, "time": time.monotonic()}


class ExpertMetrics:
    """Collector of the expert-load series; counts from attach until detach."""

    def __init__(self, model: Any, cfg: MetricsConfig):
        self.cfg = cfg
        self.num_layers, self.num_experts = model.cfg.num_hidden_layers, model.cfg.num_local_experts
        self.model, self.backend = model, model.experts
        self.listening = hasattr(self.backend, "add_listener")  # the remote backend: dispatch events
        self.tokens: torch.Tensor | None = None  # [L, E] (token, slot) pairs routed to each expert
        self.expert_tokens: list[list[int]] | None = None  # the same, from dispatch events
        if cfg.expert_metrics and self.listening:
            self.expert_tokens = [[0] * self.num_experts for _ in range(self.num_layers)]
        elif cfg.expert_metrics:
            self.tokens = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=model.device)
            model.experts = CountingExperts(self.backend, self.tokens)
        # written by the dispatch loop thread only, read (copied) at scrape time
        self.layer_worker_tokens: dict[tuple[int, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.bytes = {"sent": 0, "received": 0}
        self._snapshots: deque[tuple[float, dict[tuple[int, str], int]]] = deque([(time.monotonic(), {})])
        self._lock = threading.Lock()  # guards _snapshots against concurrent scrapes
        if self.listening:
            self.backend.add_listener(self._on_dispatch)

    def detach(self) -> None:
        if self.listening:
            self.backend.remove_listener(self._on_dispatch)
        if isinstance(self.model.experts, CountingExperts) and self.model.experts.tokens is self.tokens:
            self.model.experts = self.backend

    def _on_dispatch(self, layer: int, addr: str, experts: list[int], counts: list[int], seconds: float,
                     sent: int, received: int) -> None:
        if self.expert_tokens is not None:
            row = self.expert_tokens[layer]
            for e, n in zip(experts, counts, strict=True):
                row[e] += n
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
        rows = self.tokens.tolist() if self.tokens is not None else self.expert_tokens
        if rows is not None:
            fam = CounterMetricFamily("expertmesh_expert_tokens_total", "Tokens (token, slot pairs) the router "
                                      "sent to each logical expert.", labels=["layer", "expert"])
            for layer, row in enumerate([list(r) for r in rows]):
                for e, n in enumerate(row):
                    fam.add_metric([str(layer), str(e)], n)
            yield fam
            if table is not None:
                fam = GaugeMetricFamily("expertmesh_expert_replicas", "Workers hosting each logical expert "
                                        "in the live routing table.", labels=["layer", "expert"])
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
            serving = {a for e in range(E) for a in table.replicas.get((layer, e), ())}
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
