"""SwiGLU experts, grouped execution, and the expert-backend seam the Mixtral model calls.

A backend gets, per MoE layer, hidden [T, D], expert_ids [T, k] and routing weights [T, k] and returns the
weighted mix [T, D]. `LocalExperts` runs in-process; the router's remote backend sends the same sorted rows
to expert workers. Both share `sort_by_expert`, `run_grouped` and `combine`, so their results are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .matmul import PreparedWeight, linear, prepare_weight


class ExpertBackend(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor: ...


class SplitExpertBackend(ExpertBackend, Protocol):
    """A backend whose layer call splits in two, so the caller computes meanwhile (remote experts): `submit`
    sends the rows and returns a handle, `wait` gives the mix [T, D], `cancel` drops a handle not waited for.
    first_part=False: another micro-batch of the forward whose layer 0 was submitted first."""

    def submit(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               first_part: bool = True) -> object: ...

    def wait(self, pending: object) -> torch.Tensor: ...

    def cancel(self, pending: object) -> None: ...


def can_overlap(experts: object) -> bool:
    """Whether `experts` runs elsewhere and can split a layer call (`SplitExpertBackend`)."""
    return all(callable(getattr(experts, n, None)) for n in ("submit", "wait", "cancel"))


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: w13 = cat(w1 gate, w3 up) [2I, D], w2 down [D, I], as `prepare_weight` lays them out
    (on CPU: each with this machine's kernel plan for its shape, so every process computes an expert's rows
    with the same kernels)."""

    w13: torch.Tensor | PreparedWeight
    w2: torch.Tensor | PreparedWeight

    @staticmethod
    def from_hf(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> ExpertWeights:
        return ExpertWeights(w13=prepare_weight(torch.cat([w1, w3], dim=0)), w2=prepare_weight(w2.contiguous()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]: w2(silu(w1 x) * w3 x)."""
        gate, up = linear(x, self.w13).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2)


@dataclass(frozen=True)
class DispatchOrder:
    """The (token, slot) pairs of one layer sorted by expert."""

    order: torch.Tensor  # [T*k] flat (token*k + slot) index, sorted by expert (stable)
    inverse: torch.Tensor  # [T*k] position in the sorted order of each flat (token*k + slot)
    token: torch.Tensor  # [T*k] token row of each sorted pair
    expert: torch.Tensor  # [T*k] expert of each sorted pair
    counts: list[int]  # [E] pairs per expert


def sort_pairs(expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (order, inverse, expert) as in DispatchOrder, computed on expert_ids' device (no
    read back to the host)."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, flat[order]


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> DispatchOrder:
    order, inverse, expert = sort_pairs(expert_ids)
    counts = torch.bincount(expert, minlength=num_experts).tolist()
    return DispatchOrder(order=order, inverse=inverse, token=order // expert_ids.shape[1], expert=expert,
                         counts=counts)


def run_grouped(x_sorted: torch.Tensor, experts: list[ExpertWeights], counts: list[int]) -> torch.Tensor:
    """x_sorted [N, D] rows grouped by expert (counts[i] rows for experts[i]) -> outputs [N, D], same order.

    One matmul chain per expert that was hit; no loop over tokens.
    """
    out = torch.empty_like(x_sorted)
    start = 0
    for expert, n in zip(experts, counts, strict=True):
        if n:
            out[start:start + n] = expert(x_sorted[start:start + n])
            start += n
    if start != x_sorted.shape[0]:
        raise ValueError(f"counts sum to {start}, but {x_sorted.shape[0]} rows were given")
    return out


def combine(y_sorted: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weight each expert output by its fp32 routing weight and sum each token's k outputs -> [T, D].

    A gather back to (token, slot) order and a sum over slots: no scatter (index_add_ is slow in bf16 on CPU).
    """
    T, k = weights.shape
    y = y_sorted[inverse].view(T, k, -1)  # [T, k, D]
    return (y * weights[:, :, None]).sum(dim=1).to(y_sorted.dtype)


class LocalExperts:
    """In-process backend: experts[layer][expert] on this device."""

    def __init__(self, experts: list[list[ExpertWeights]]):
        self.experts = experts

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        plan = sort_by_expert(expert_ids, len(self.experts[layer]))
        y = run_grouped(hidden[plan.token], self.experts[layer], plan.counts)
        return combine(y, plan.inverse, weights)
