"""Placement of experts onto workers, and the Ray placement group that gives each worker its own bundle."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("contiguous", "round-robin")
PG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementError(ValueError):
    """A placement that cannot work; the message says which input is wrong."""


@dataclass(frozen=True)
class PlacementPlan:
    """Every (layer, expert) on exactly one worker; a worker hosts the same experts in every layer."""

    num_layers: int
    num_experts: int
    num_workers: int
    experts_of_worker: tuple[tuple[int, ...], ...]  # [worker] -> expert ids

    @staticmethod
    def build(num_layers: int, num_experts: int, num_workers: int, strategy: str = "contiguous") -> PlacementPlan:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise PlacementError(f"workers: need at least 1 expert worker, got {num_workers}")
        if num_workers > num_experts:
            raise PlacementError(f"workers: {num_workers} workers for {num_experts} experts per layer; "
                                 f"every worker needs at least one expert (use --workers <= {num_experts})")
        if strategy not in STRATEGIES:
            raise PlacementError(f"placement: {strategy!r} is not one of {STRATEGIES}")
        if strategy == "round-robin":
            groups = [tuple(range(w, num_experts, num_workers)) for w in range(num_workers)]
        else:
            base, extra = divmod(num_experts, num_workers)
            groups, start = [], 0
            for w in range(num_workers):
                n = base + (1 if w < extra else 0)
                groups.append(tuple(range(start, start + n)))
                start += n
        return PlacementPlan(num_layers, num_experts, num_workers, tuple(groups))

    def pairs(self, worker: int) -> list[tuple[int, int]]:
        """(layer, expert) pairs the worker hosts."""
        return [(layer, e) for layer in range(self.num_layers) for e in self.experts_of_worker[worker]]

    def worker_of_expert(self) -> dict[int, int]:
        return {e: w for w, experts in enumerate(self.experts_of_worker) for e in experts}


def placement_bundles(num_workers: int, use_gpus: bool, worker_cpus: int = 1,
                      router_cpus: int = 1) -> list[dict[str, float]]:
    """One bundle per expert worker, then the router's: each with a whole GPU where the cluster has GPUs."""
    cpus = [worker_cpus] * num_workers + [router_cpus]
    return [{"CPU": c, "GPU": 1} if use_gpus else {"CPU": c} for c in cpus]
