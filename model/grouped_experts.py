"""Experts as one stacked weight per layer, run without host syncs or a Python loop over experts (the GPU path).

Every layer's experts are stacked (w13 [E, 2I, D], w2 [E, D, I]); a layer call sorts its (token, slot) pairs
by expert and runs each weight as ONE grouped product over all experts. Group boundaries are found on the
device (searchsorted over the sorted expert ids), so nothing reads a tensor back to the host: on CUDA the
kernels of a whole forward queue without waiting for each other.

Two ways to run the grouped product, both sync-free:
- `grouped_mm`: torch._grouped_mm with device offsets (CUDA bf16 on sm90/sm100, where torch runs it as one
  CUTLASS kernel; and CPU, where offsets live on the host anyway).
- `padded`: each expert's rows scattered into an [E, T, ...] slab (top-k experts are distinct, so an expert
  gets at most T rows) and one torch.bmm per weight. It computes E/k times the rows, which costs nothing
  extra while decode is bound by reading the weights, and runs on any device and dtype (torch's CUDA
  _grouped_mm for other dtypes or GPUs copies the offsets to the host and loops over groups).

Results agree with `LocalExperts` to the products' rounding (different kernels), not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .experts import combine, sort_pairs

MODES = ("grouped_mm", "padded")


@dataclass(frozen=True)
class StackedLayer:
    """One layer's experts: w13 = cat(w1 gate, w3 up) per expert [E, 2I, D], w2 down [E, D, I]."""

    w13: torch.Tensor
    w2: torch.Tensor

    @staticmethod
    def from_hf(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> StackedLayer:
        """experts: (w1 [I, D], w3 [I, D], w2 [D, I]) per expert, in expert order."""
        return StackedLayer(w13=torch.stack([torch.cat([w1, w3], dim=0) for w1, w3, _ in experts]),
                            w2=torch.stack([w2 for _, _, w2 in experts]))


def grouped_mm_runs_on_device(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here as one kernel with device offsets (no host copy of them)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    return False


def default_mode(device: torch.device, dtype: torch.dtype) -> str:
    return "grouped_mm" if grouped_mm_runs_on_device(device, dtype) else "padded"


def resolve_experts_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """"per_expert" or one of MODES for an `experts_impl` setting: "auto" is per_expert on CPU (the measured
    kernel plans), the device's default mode elsewhere; ValueError for an unknown name."""
    if impl not in ("auto", "per_expert", *MODES):
        raise ValueError(f"experts_impl: expected auto, per_expert, {', '.join(MODES)}; got {impl!r}")
    if impl != "auto":
        return impl
    return "per_expert" if device.type == "cpu" else default_mode(device, dtype)


class GroupedExperts:
    """In-process expert backend over `StackedLayer`s; mode: one of MODES, or None for this device's default."""

    def __init__(self, layers: list[StackedLayer], mode: str | None = None):
        if not layers:
            raise ValueError("GroupedExperts needs at least one layer")
        w = layers[0].w13
        self.mode = mode or default_mode(w.device, w.dtype)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        self.layers = layers
        self.num_experts = int(w.shape[0])

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], expert_ids [T, k] (distinct per token, as top-k gives), weights [T, k] fp32 -> [T, D]."""
        T, k = expert_ids.shape
        order, inverse, expert = sort_pairs(expert_ids)  # pairs sorted by expert, on the device
        groups = torch.arange(self.num_experts, device=expert.device, dtype=expert.dtype)
        ends = torch.searchsorted(expert, groups, right=True)  # [E] end of each expert's rows: on the device
        y = grouped_ffn(hidden[order // k], self.layers[layer], ends, self.mode, max_rows=T, expert=expert)
        return combine(y, inverse, weights)


def grouped_ffn(x: torch.Tensor, stacked: StackedLayer, ends: torch.Tensor, mode: str, max_rows: int,
                expert: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D] rows grouped by expert (group g: rows [ends[g-1], ends[g]) for stacked expert g) -> SwiGLU
    outputs [N, D], same order. ends: [G] on x's device; max_rows: an upper bound on any group's rows (padded
    mode's slab height); expert: [N] group of each row, if the caller has it (else derived from ends)."""
    if mode == "grouped_mm":
        offs = ends.to(torch.int32)
        gate, up = torch._grouped_mm(x, stacked.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, stacked.w2.transpose(1, 2), offs=offs)
    rows = torch.arange(x.shape[0], device=x.device)
    if expert is None:
        expert = torch.searchsorted(ends, rows, right=True)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    slot = rows - starts[expert]  # row within its group, < max_rows
    slab = x.new_zeros(stacked.w13.shape[0], max_rows, x.shape[1])
    slab[expert, slot] = x
    gate, up = torch.bmm(slab, stacked.w13.transpose(1, 2)).chunk(2, dim=-1)  # [G, max_rows, I] each
    return torch.bmm(F.silu(gate) * up, stacked.w2.transpose(1, 2))[expert, slot]
