"""Placement of experts onto workers, and the Ray placement group bundles the workers and router run in.

A plan maps every (layer, expert) to the workers that host a replica of it (1..k, never two on one worker); a
worker may host different experts in different layers. `build` gives the static start-up plans (one replica
each, the same experts in every layer); cluster/eplb.py computes load-balanced plans with replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("contiguous", "round-robin")
PG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementError(ValueError):
    """A placement that cannot work; the message says which input is wrong."""


@dataclass(frozen=True)
class PlacementPlan:
    """workers_of[layer][expert]: the worker indices (ascending) hosting a replica of that expert."""

    num_layers: int
    num_experts: int
    num_workers: int
    workers_of: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        if len(self.workers_of) != self.num_layers:
            raise PlacementError(f"plan: {len(self.workers_of)} layers given, the model has {self.num_layers}")
        used: set[int] = set()
        for layer, row in enumerate(self.workers_of):
            if len(row) != self.num_experts:
                raise PlacementError(f"plan: layer {layer} lists {len(row)} experts, the model has "
                                     f"{self.num_experts}")
            for e, workers in enumerate(row):
                if not workers:
                    raise PlacementError(f"plan: layer {layer} expert {e} has no worker")
                if len(set(workers)) != len(workers):
                    raise PlacementError(f"plan: layer {layer} expert {e} has two replicas on one worker "
                                         f"({list(workers)})")
                bad = [w for w in workers if not 0 <= w < self.num_workers]
                if bad:
                    raise PlacementError(f"plan: layer {layer} expert {e} names worker {bad[0]} of "
                                         f"{self.num_workers}")
                used.update(workers)
        idle = sorted(set(range(self.num_workers)) - used)
        if idle:
            raise PlacementError(f"plan: worker {idle[0]} hosts no expert ({len(idle)} such)")

    @staticmethod
    def build(num_layers: int, num_experts: int, num_workers: int, strategy: str = "contiguous") -> PlacementPlan:
        """One replica per expert, the same experts on a worker in every layer."""
        if not isinstance(num_workers, int) or num_workers < 1:
            raise PlacementError(f"workers: need at least 1 expert worker, got {num_workers}")
        if num_workers > num_experts:
            raise PlacementError(f"workers: {num_workers} workers for {num_experts} experts per layer; "
                                 f"every worker needs at least one expert (use --workers <= {num_experts})")
        if strategy not in STRATEGIES:
            raise PlacementError(f"placement: {strategy!r} is not one of {STRATEGIES}")
        if strategy == "round-robin":
            owner = [e % num_workers for e in range(num_experts)]
        else:
            base, extra = divmod(num_experts, num_workers)
            owner = []
            for w in range(num_workers):
                owner += [w] * (base + (1 if w < extra else 0))
        row = tuple((w,) for w in owner)
        return PlacementPlan(num_layers, num_experts, num_workers, (row,) * num_layers)

    @staticmethod
    def from_worker_pairs(num_layers: int, num_experts: int,
                          worker_pairs: list[list[tuple[int, int]]] | list[set[tuple[int, int]]]) -> PlacementPlan:
        """The plan in which worker i hosts exactly worker_pairs[i]."""
        rows = [[[] for _ in range(num_experts)] for _ in range(num_layers)]
        for w, pairs in enumerate(worker_pairs):
            for layer, e in sorted(pairs):
                if not (0 <= layer < num_layers and 0 <= e < num_experts):
                    raise PlacementError(f"plan: worker {w} pair (layer {layer}, expert {e}) is outside the "
                                         f"model ({num_layers} layers x {num_experts} experts)")
                rows[layer][e].append(w)
        return PlacementPlan(num_layers, num_experts, len(worker_pairs),
                             tuple(tuple(tuple(ws) for ws in row) for row in rows))

    def pairs(self, worker: int) -> list[tuple[int, int]]:
        """(layer, expert) pairs the worker hosts, sorted."""
        return [(layer, e) for layer, row in enumerate(self.workers_of)
                for e, workers in enumerate(row) if worker in workers]

    def all_pairs(self) -> list[list[tuple[int, int]]]:
        """pairs(w) for every worker."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_workers)]
        for layer, row in enumerate(self.workers_of):
            for e, workers in enumerate(row):
                for w in workers:
                    out[w].append((layer, e))
        return out

    def replica_counts(self) -> list[list[int]]:
        """[layer][expert] -> number of replicas."""
        return [[len(ws) for ws in row] for row in self.workers_of]

    def slots(self) -> int:
        """Physical expert slots in use, over all layers."""
        return sum(len(ws) for row in self.workers_of for ws in row)

    @property
    def experts_of_worker(self) -> tuple[tuple[int, ...], ...]:
        """[worker] -> expert ids, for a plan that hosts the same experts in every layer (as `build` makes)."""
        first = self.workers_of[0]
        if any(row != first for row in self.workers_of):
            raise PlacementError("plan: workers host different experts per layer; use pairs(worker)")
        return tuple(tuple(e for e, ws in enumerate(first) if w in ws) for w in range(self.num_workers))

    def worker_of_expert(self) -> dict[int, int]:
        """expert -> its worker, for a `build` plan (one replica, same in every layer)."""
        return {e: w for w, experts in enumerate(self.experts_of_worker) for e in experts}

    def worker_loads(self, load: list[list[float]]) -> list[list[float]]:
        """[layer][worker] expected load when each expert's load `load[layer][expert]` splits evenly over its
        replicas (as the router splits rows)."""
        out = [[0.0] * self.num_workers for _ in range(self.num_layers)]
        for layer, row in enumerate(self.workers_of):
            for e, workers in enumerate(row):
                for w in workers:
                    out[layer][w] += float(load[layer][e]) / len(workers)
        return out


def imbalance(loads: list[float]) -> float:
    """max / mean over the given loads (1.0 = balanced; also 1.0 when all are zero). Balancedness, as SGLang
    reports it, is the inverse (mean / max); TensorRT-LLM's (max - mean) / mean is this minus one."""
    total = sum(loads)
    return max(loads) * len(loads) / total if loads and total > 0 else 1.0


def placement_bundles(num_workers: int, use_gpus: bool, worker_cpus: int = 1,
                      router_cpus: int = 1) -> list[dict[str, float]]:
    """One bundle per expert worker, then the router's: each with a whole GPU where the cluster has GPUs."""
    cpus = [worker_cpus] * num_workers + [router_cpus]
    return [{"CPU": c, "GPU": 1} if use_gpus else {"CPU": c} for c in cpus]
