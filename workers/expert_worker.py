"""One expert worker: the FFNs of its (layer, expert) pairs, run with the same grouped code as in-process."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from model.config import MixtralConfig
from model.experts import ExpertWeights, run_grouped
from model.loader import LoadStats, load_tensors, parse_dtype
from model.weights import expert_tensor_name, experts_filter

log = logging.getLogger(__name__)
COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class WorkerStats:
    """Counters for the metrics exporter (export as counters; rates are PromQL's job)."""

    tokens: dict[tuple[int, int], int] = field(default_factory=dict)  # rows served per (layer, expert)
    requests: dict[str, int] = field(default_factory=dict)  # Dispatch calls by gRPC status code name
    compute_seconds: float = 0.0  # time inside successful forward calls
    # forward calls per COMPUTE_BUCKETS bucket (not cumulative; the last is above every bound)
    compute_counts: list[int] = field(default_factory=lambda: [0] * (len(COMPUTE_BUCKETS) + 1))

    def count_request(self, code: str) -> None:
        self.requests[code] = self.requests.get(code, 0) + 1

    def observe_compute(self, seconds: float) -> None:
        self.compute_seconds += seconds
        self.compute_counts[bisect_left(COMPUTE_BUCKETS, seconds)] += 1

    def to_dict(self) -> dict:
        return {"tokens": dict(self.tokens), "requests": dict(self.requests),
                "compute_seconds": self.compute_seconds, "compute_counts": list(self.compute_counts)}


def resolve_device(device: str) -> torch.device:
    """`device` if usable here; a cuda request falls back to CPU when no GPU is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r asked for but CUDA is not available; using cpu", device)
        return torch.device("cpu")
    return torch.device(device)


class ExpertWorker:
    def __init__(self, model_dir: str, pairs: list[tuple[int, int]], dtype: str = "float32",
                 device: str = "cpu", worker_id: str = "w0"):
        self.cfg = MixtralConfig.from_file(model_dir)
        self.pairs = sorted({(int(layer), int(e)) for layer, e in pairs})
        if not self.pairs or len(self.pairs) != len(pairs):
            raise ValueError(f"worker {worker_id}: pairs must be non-empty and distinct, got {pairs}")
        L, E = self.cfg.num_hidden_layers, self.cfg.num_local_experts
        for layer, e in self.pairs:
            if not (0 <= layer < L and 0 <= e < E):
                raise ValueError(f"worker {worker_id}: pair (layer {layer}, expert {e}) is outside the model "
                                 f"({L} layers x {E} experts)")
        self.worker_id = worker_id
        self.dtype = parse_dtype(dtype)
        self.device = resolve_device(device)
        self.hidden_size = self.cfg.hidden_size
        self.load_stats = LoadStats()
        t = load_tensors(model_dir, self.cfg, keep=experts_filter(self.pairs), dtype=self.dtype,
                         device=self.device, stats=self.load_stats)
        self.experts: dict[tuple[int, int], ExpertWeights] = {
            (layer, e): ExpertWeights.from_hf(*(t.pop(expert_tensor_name(layer, e, w))
                                                for w in ("w1", "w3", "w2")))
            for layer, e in self.pairs}
        self.layers = sorted({layer for layer, _ in self.pairs})
        self.stats = WorkerStats()

    def forward(self, layer: int, expert_ids: list[int], counts: list[int],
                hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] sorted by expert (counts[i] rows for expert_ids[i]) -> outputs [N, D] on CPU."""
        return self.forward_timed(layer, expert_ids, counts, hidden)[0]

    def forward_timed(self, layer: int, expert_ids: list[int], counts: list[int],
                      hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`forward` plus the seconds it took (device copies included)."""
        experts = self._check(layer, expert_ids, counts, hidden)
        t0 = time.perf_counter()
        y = run_grouped(hidden.to(self.device), experts, counts)
        if self.device.type == "cuda":
            y = y.cpu()  # synchronizes
        dt = time.perf_counter() - t0
        self.stats.observe_compute(dt)
        for e, n in zip(expert_ids, counts, strict=True):
            self.stats.tokens[(layer, e)] = self.stats.tokens.get((layer, e), 0) + n
        return y, dt

    def _check(self, layer: int, expert_ids: list[int], counts: list[int],
               hidden: torch.Tensor) -> list[ExpertWeights]:
        who = f"worker {self.worker_id}"
        if layer not in self.layers:
            raise ValueError(f"{who}: layer {layer} is not hosted here (hosted layers: {self.layers})")
        if len(expert_ids) != len(counts):
            raise ValueError(f"{len(expert_ids)} expert_ids but {len(counts)} counts")
        if len(set(expert_ids)) != len(expert_ids):
            raise ValueError(f"duplicate expert ids {list(expert_ids)}")
        missing = [e for e in expert_ids if (layer, e) not in self.experts]
        if missing:
            hosted = [e for lay, e in self.pairs if lay == layer]
            raise ValueError(f"{who}: expert {missing[0]} of layer {layer} is not hosted here "
                             f"(hosted: {hosted})")
        if any(n < 0 for n in counts):
            raise ValueError(f"negative count in {list(counts)}")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden has shape {list(hidden.shape)}, expected [N, {self.hidden_size}]")
        if hidden.dtype != self.dtype:
            raise ValueError(f"hidden has dtype {hidden.dtype}, {who} runs {self.dtype}")
        if hidden.shape[0] == 0:
            raise ValueError("empty request: no hidden rows")
        if sum(counts) != hidden.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)}, but hidden has {hidden.shape[0]} rows")
        return [self.experts[(layer, e)] for e in expert_ids]
