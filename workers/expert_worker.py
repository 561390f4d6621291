"""One expert worker: the FFNs of its (layer, expert) pairs, run with the same grouped code as in-process."""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from model.config import MixtralConfig
from model.experts import ExpertWeights, run_grouped
from model.grouped_experts import StackedLayer, grouped_ffn, resolve_experts_impl
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
    """The FFNs of a set of (layer, expert) pairs. `add_experts` / `drop_experts` change the set while
    `forward` runs on another thread: the hosted experts are an immutable dict swapped whole, and a forward
    works on the dict it started with (weights it already holds stay alive until it returns).

    experts_impl: "per_expert" runs each expert's rows with the CPU's measured kernel plans; "grouped_mm" or
    "padded" keeps each layer's hosted experts stacked (the experts are views into the stack, no second copy)
    and runs one grouped product per weight (model/grouped_experts.py); "auto": per_expert on CPU, the
    device's grouped default on a GPU."""

    def __init__(self, model_dir: str, pairs: list[tuple[int, int]], dtype: str = "float32",
                 device: str = "cpu", worker_id: str = "w0", experts_impl: str = "auto"):
        self.cfg = MixtralConfig.from_file(model_dir)
        self.model_dir = model_dir
        self.worker_id = worker_id
        wanted = self._checked_pairs(pairs)
        if not wanted:
            raise ValueError(f"worker {worker_id}: pairs must be non-empty and distinct, got {pairs}")
        self.dtype = parse_dtype(dtype)
        self.device = resolve_device(device)
        self.experts_impl = resolve_experts_impl(experts_impl, self.device, self.dtype)
        self.hidden_size = self.cfg.hidden_size
        self.load_stats = LoadStats()
        self._mutate = threading.Lock()  # add/drop one at a time; forward never takes it
        self._set_hosted(self._load(wanted))
        self.stats = WorkerStats()

    def _set_hosted(self, experts: dict[tuple[int, int], ExpertWeights],
                    changed: set[int] | None = None) -> None:
        """Install a new expert set; grouped: restack the `changed` layers (None: all), keep the others' stacks."""
        layers = frozenset(layer for layer, _ in experts)
        stacks: dict[int, tuple[tuple[int, ...], StackedLayer]] = {}
        if self.experts_impl != "per_expert":
            old = self._hosted[2] if changed is not None else {}
            experts = dict(experts)
            for layer in layers:
                if changed is not None and layer not in changed and layer in old:
                    stacks[layer] = old[layer]
                    continue
                ids = tuple(sorted(e for lay, e in experts if lay == layer))
                stack = StackedLayer(torch.stack([experts[(layer, e)].w13 for e in ids]),
                                     torch.stack([experts[(layer, e)].w2 for e in ids]))
                stacks[layer] = (ids, stack)
                for g, e in enumerate(ids):  # the experts become views into the stack: no second copy
                    experts[(layer, e)] = ExpertWeights(stack.w13[g], stack.w2[g])
        # one attribute, replaced whole: a reader sees the old or the new set, never a mix
        self._hosted = (experts, layers, stacks)

    @property
    def experts(self) -> dict[tuple[int, int], ExpertWeights]:
        return self._hosted[0]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    @property
    def layers(self) -> list[int]:
        return sorted(self._hosted[1])

    def _checked_pairs(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        wanted = sorted({(int(layer), int(e)) for layer, e in pairs})
        if len(wanted) != len(pairs):
            raise ValueError(f"worker {self.worker_id}: pairs must be distinct, got {pairs}")
        L, E = self.cfg.num_hidden_layers, self.cfg.num_local_experts
        for layer, e in wanted:
            if not (0 <= layer < L and 0 <= e < E):
                raise ValueError(f"worker {self.worker_id}: pair (layer {layer}, expert {e}) is outside the "
                                 f"model ({L} layers x {E} experts)")
        return wanted

    def _load(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], ExpertWeights]:
        """Read only these pairs' tensors from the checkpoint."""
        t = load_tensors(self.model_dir, self.cfg, keep=experts_filter(pairs), dtype=self.dtype,
                         device=self.device, stats=self.load_stats)
        make = ExpertWeights.from_hf if self.experts_impl == "per_expert" else \
            (lambda w1, w3, w2: ExpertWeights(torch.cat([w1, w3], dim=0), w2))  # plain: stacked next
        return {(layer, e): make(*(t.pop(expert_tensor_name(layer, e, w)) for w in ("w1", "w3", "w2")))
                for layer, e in pairs}

    def add_experts(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Load the pairs not hosted yet (the others are left as they are); returns the pairs loaded."""
        with self._mutate:
            new = [p for p in self._checked_pairs(pairs) if p not in self.experts]
            if new:
                self._set_hosted({**self.experts, **self._load(new)}, {layer for layer, _ in new})
                log.info("worker %s: loaded %d experts (%s)", self.worker_id, len(new), new)
            return new

    def drop_experts(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Free the pairs (only once nothing routes to them any more); pairs not hosted are ignored, and a
        drop that would leave no expert is refused (remove the worker instead). Returns the pairs dropped."""
        with self._mutate:
            gone = [p for p in self._checked_pairs(pairs) if p in self.experts]
            if gone and len(gone) == len(self.experts):
                raise ValueError(f"worker {self.worker_id}: dropping {len(gone)} pairs would leave no expert; "
                                 f"remove the worker instead")
            if gone:
                dropped = set(gone)
                self._set_hosted({k: v for k, v in self.experts.items() if k not in dropped},
                                 {layer for layer, _ in gone})
                log.info("worker %s: dropped %d experts (%s)", self.worker_id, len(gone), gone)
            return gone

    def forward(self, layer: int, expert_ids: list[int], counts: list[int],
                hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] sorted by expert (counts[i] rows for expert_ids[i]) -> outputs [N, D] on CPU."""
        return self.forward_timed(layer, expert_ids, counts, hidden)[0]

    def forward_timed(self, layer: int, expert_ids: list[int], counts: list[int],
                      hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`forward` plus the seconds it took (device copies included)."""
        experts, stack = self._check(layer, expert_ids, counts, hidden)
        t0 = time.perf_counter()
        x = hidden.to(self.device)
        ends = self._stack_ends(stack, expert_ids, counts)
        if ends is None:
            y = run_grouped(x, experts, counts)
        else:
            y = grouped_ffn(x, stack[1], torch.tensor(ends, device=self.device), self.experts_impl, max(counts))
        if self.device.type == "cuda":
            y = y.cpu()  # synchronizes
        dt = time.perf_counter() - t0
        self.stats.observe_compute(dt)
        for e, n in zip(expert_ids, counts, strict=True):
            self.stats.tokens[(layer, e)] = self.stats.tokens.get((layer, e), 0) + n
        return y, dt

    @staticmethod
    def _stack_ends(stack, expert_ids: list[int], counts: list[int]) -> list[int] | None:
        """The end row of each stacked expert's group for this request, or None where it cannot run grouped:
        per_expert mode, or the request's experts not in the stack's order."""
        if stack is None:
            return None
        ids, _ = stack
        where = {e: g for g, e in enumerate(ids)}
        groups = [where[e] for e in expert_ids]
        if groups != sorted(groups):
            return None
        rows = [0] * len(ids)
        for g, n in zip(groups, counts, strict=True):
            rows[g] = n
        ends, total = [], 0
        for n in rows:
            total += n
            ends.append(total)
        return ends

    def _check(self, layer: int, expert_ids: list[int], counts: list[int],
               hidden: torch.Tensor) -> tuple[list[ExpertWeights], tuple | None]:
        """The request's experts and the layer's stack (None: per_expert), from one snapshot of the hosted set;
        ValueError naming what is wrong with the request."""
        who = f"worker {self.worker_id}"
        hosted, layers, stacks = self._hosted  # one snapshot for the whole call
        if layer not in layers:
            raise ValueError(f"{who}: layer {layer} is not hosted here (hosted layers: {sorted(layers)})")
        if len(expert_ids) != len(counts):
            raise ValueError(f"{len(expert_ids)} expert_ids but {len(counts)} counts")
        if len(set(expert_ids)) != len(expert_ids):
            raise ValueError(f"duplicate expert ids {list(expert_ids)}")
        missing = [e for e in expert_ids if (layer, e) not in hosted]
        if missing:
            here = sorted(e for lay, e in hosted if lay == layer)
            raise ValueError(f"{who}: expert {missing[0]} of layer {layer} is not hosted here "
                             f"(hosted: {here})")
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
        return [hosted[(layer, e)] for e in expert_ids], stacks.get(layer)
