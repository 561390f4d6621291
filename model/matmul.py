"""Weight products (`linear`) by the kernel measured fastest for each weight shape, dtype and row count here.

`prepare_weight` asks `kernel_choice` for the plan of the weight's (dtype, shape, torch thread count) on this
machine (cached on disk, measured on first use) and returns a `PreparedWeight`: the weight in the plan's layout
and the kernel per row count. The candidates, per dtype (those that run on this CPU):
- `onednn_packed`: oneDNN's inner product on the weight reordered once into its blocked layout (fp32; bf16
  native with AVX512-BF16 or AMX, and there 1.2-3x faster than the rest).
- `onednn_plain`: the same product on the plain weight (on an AMX Xeon, fp32 at 1 row up to 1.4x faster
  than the blocked layout).
- `aten`: F.linear (MKL sgemm in fp32: at 1-2 rows the fastest on that Xeon; bf16 native or emulated).
- `upcast` (bf16): the product in fp32 through oneDNN, rounded back to bf16; the weight upcast
  UPCAST_BLOCK_BYTES of fp32 at a time into a reused per-thread buffer, so the fp32 copy stays in cache (the
  fastest from 6 rows on a 2-core AVX2-only EPYC).
- torch._grouped_mm exists on CPU in torch 2.13 but runs each group as a plain mm: 1.5-2x slower than
  `onednn_packed` at 1-16 rows per expert on the AVX512-BF16 EPYC (bench shapes); on the AMX Xeon, a whole
  bench layer (8 experts, top-2) measured with 2 threads against these per-expert plans: bf16 1.28x / 1.02x /
  0.97x the time at 1 / 16 / 64 tokens, fp32 0.87x / 1.24x / 1.41x. So it is not a per-weight candidate here;
  it is the GPU path (`model/grouped_experts.py`, `Mixtral.from_pretrained(experts_impl=...)`).
The `fixed` plan (EXPERTMESH_KERNELS=fixed, or where the plan cache cannot be written) is the pre-measurement
default: fp32 `onednn_packed`, bf16 `upcast`. A measured plan runs one kernel at every row count where a
measured row-invariant one is within 5% of the fastest mix (see kernel_choice.choose), else the fastest
kernel of one layout per row-count range.
On CUDA, and for other dtypes, `prepare_weight` leaves the weight as it is and `linear` is F.linear.

Bit-exactness contracts: every kernel is deterministic for a given (weight, padded row count, thread count), so
processes that run the same plan give the same bits for the same rows (all processes on a machine do: see
kernel_choice). `upcast` gives exactly the fp32 product of the upcast operands, rounded once. The fp32 kernels
agree with F.linear to ~1e-6 relative, the bf16 ones with the fp32 product to bf16 rounding, not bit for bit;
so different plans (machines, thread counts, EXPERTMESH_KERNELS values) agree only to those tolerances.

oneDNN keeps a primitive (JIT kernel and descriptors, ~0.75 MiB) per distinct product shape, up to 1024 of
them. Serving sends every row count from 1 to the step's token budget (decode batches, prefill chunks, expert
groups), so a process grew by hundreds of MiB over a 30-minute soak, one new row count at a time. Products
therefore run on row counts rounded up to `row_bucket` (zero rows appended, the result sliced): a few dozen
shapes per weight, all seen within the first minute of serving.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernel_choice import ENV, Candidate, Kernel, KernelPlan, cached_plan, dtype_name, parse_setting

# oneDNN picks its blocked weight layout for an expected row count; measured fine from 1 to 1024 rows.
PACK_ROWS_HINT = 16
UPCAST_BLOCK_BYTES = 4 << 20
PLANNED_DTYPES = (torch.float32, torch.bfloat16)
_scratch = threading.local()  # .buf: this thread's fp32 buffer for upcast weight blocks


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's inner product (plain and reordered weights) runs on this CPU in `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 8, dtype=dtype)
        x = torch.ones(2, 8, dtype=dtype)
        packed = _pack(w)
        ok = all(torch.equal(_onednn(x, p), F.linear(x, w)) for p in (w, packed))
        ok = ok and torch.equal(packed.to_dense(), w)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return ok


def onednn_fp32_available() -> bool:
    return onednn_available(torch.float32)


def row_bucket(n: int) -> int:
    """The row count a product of n rows runs with: n up to 16, then multiples of 8 up to 64 (a decode batch's
    rows per expert: padding them to 16 cost up to 1.5x), of 16 up to 128, of 32 up to 512 and of 128 beyond
    (38 buckets up to 512 rows)."""
    if n <= 16:
        return n
    step = 8 if n <= 64 else 16 if n <= 128 else 32 if n <= 512 else 128
    return -(-n // step) * step


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    b = row_bucket(n)
    if b != n:
        padded = x.new_zeros(b, x.shape[1])
        padded[:n] = x
        return torch.ops.mkldnn._linear_pointwise(padded, w, None, "none", [], "")[:n]
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS_HINT)


def _plain(w: torch.Tensor) -> torch.Tensor:
    return w.contiguous()


@functools.cache
def candidates(dtype: torch.dtype) -> tuple[Candidate, ...]:
    """The kernels that run on this CPU for `dtype` weights, with the layout each reads."""
    found = []
    if onednn_available(dtype):
        found.append(Candidate("onednn_packed", "onednn_blocked", _pack, _onednn))
        found.append(Candidate("onednn_plain", "plain", _plain, _onednn))
    found.append(Candidate("aten", "plain", _plain, F.linear))
    if dtype == torch.bfloat16:
        found.append(Candidate("upcast", "plain", _plain, _upcast_linear))
    return tuple(found)


def fixed_plan(dtype: torch.dtype, shape: tuple[int, int], threads: int) -> KernelPlan:
    """The default without measuring (EXPERTMESH_KERNELS=fixed): what ran before plans were measured."""
    if dtype == torch.float32:
        packed = onednn_available(dtype)
        layout, kernels = ("onednn_blocked", ((1, "onednn_packed"),)) if packed else ("plain", ((1, "aten"),))
    else:
        layout, kernels = "plain", ((1, "upcast"),)
    return KernelPlan(dtype_name(dtype), shape, threads, layout, kernels, source="fixed")


def single_kernel_plan(dtype: torch.dtype, shape: tuple[int, int], threads: int, kernel: str,
                       source: str = "env") -> KernelPlan:
    """`kernel` (one of `candidates(dtype)`) at every row count."""
    layout = {c.name: c.layout for c in candidates(dtype)}.get(kernel)
    if layout is None:
        raise ValueError(f"kernel {kernel!r} does not run {dtype_name(dtype)} here "
                         f"(available: {', '.join(c.name for c in candidates(dtype))})")
    return KernelPlan(dtype_name(dtype), shape, threads, layout, ((1, kernel),), source=source)


def plan_for(w: torch.Tensor) -> KernelPlan:
    """The plan for a CPU weight of w's dtype and shape at this thread count, per EXPERTMESH_KERNELS."""
    return resolve_plan(w.dtype, (w.shape[0], w.shape[1]), torch.get_num_threads(), os.environ.get(ENV, ""))


@functools.cache  # per process: one cache read per (dtype, shape, threads, setting)
def resolve_plan(dtype: torch.dtype, shape: tuple[int, int], threads: int, setting_text: str) -> KernelPlan:
    cands = candidates(dtype)
    setting = parse_setting(setting_text, {dtype_name(d): {c.name for c in candidates(d)} for d in PLANNED_DTYPES})
    if setting == "fixed":
        return fixed_plan(dtype, shape, threads)
    if isinstance(setting, dict) and dtype_name(dtype) in setting:
        return single_kernel_plan(dtype, shape, threads, setting[dtype_name(dtype)])
    return cached_plan(shape, dtype, list(cands), threads, lambda: fixed_plan(dtype, shape, threads),
                       insist_invariant=setting == "invariant")


@dataclass(frozen=True)
class PreparedWeight:
    """A CPU weight [out, in] in its plan's layout, and the kernel for each row count."""

    data: torch.Tensor = field(repr=False)
    plan: KernelPlan
    runs: tuple[tuple[int, Kernel], ...] = field(repr=False)  # (first row count, kernel), as plan.kernels

    @staticmethod
    def build(w: torch.Tensor, plan: KernelPlan) -> PreparedWeight:
        by_name = {c.name: c for c in candidates(w.dtype)}
        prepare = next(c.prepare for c in by_name.values() if c.layout == plan.layout)
        return PreparedWeight(prepare(w), plan, tuple((first, by_name[k].run) for first, k in plan.kernels))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.plan.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to_dense(self) -> torch.Tensor:
        return self.data.to_dense() if is_packed(self.data) else self.data

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = row_bucket(n)
        run = self.runs[0][1]
        for first, kernel in self.runs:
            if b < first:
                break
            run = kernel
        if b == n:
            return run(x.contiguous(), self.data)
        padded = x.new_zeros(b, x.shape[1])
        padded[:n] = x
        return run(padded, self.data)[:n]


def is_packed(w: torch.Tensor | PreparedWeight) -> bool:
    """Whether `w` is in oneDNN's blocked (opaque) layout."""
    return is_packed(w.data) if isinstance(w, PreparedWeight) else w.layout == torch._mkldnn


def prepare_weight(w: torch.Tensor) -> torch.Tensor | PreparedWeight:
    """`w` [out, in] as `linear` runs it fastest here: a `PreparedWeight` on CPU for fp32 and bf16 (layout and
    kernels per this machine's plan), otherwise `w` itself."""
    if w.device.type == "cpu" and w.dtype in PLANNED_DTYPES and w.dim() == 2:
        return PreparedWeight.build(w, plan_for(w))
    return w


def linear(x: torch.Tensor, w: torch.Tensor | PreparedWeight) -> torch.Tensor:
    """x [N, in] @ w [out, in].T -> [N, out] (no bias); `w` plain or from `prepare_weight`.

    Deterministic for a given (rows, weight, plan, thread count): every caller that computes the same rows with
    the same weights and plan gets bit-identical results. A plain weight runs the `fixed` plan's kernels.
    """
    if isinstance(w, PreparedWeight):
        return w(x)
    if is_packed(w):
        return _onednn(x.contiguous(), w)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2:
        return _upcast_linear(x, w)
    return F.linear(x, w)


def _upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 x @ bf16 w.T computed in fp32 and rounded to bf16, upcasting w one cache-sized block of rows at a time."""
    n_out, k = w.shape
    block = min(n_out, max(16, UPCAST_BLOCK_BYTES // (4 * k)))
    xf = x.float().contiguous()
    product = _onednn if onednn_available(torch.float32) else F.linear
    out = torch.empty(x.shape[0], n_out, dtype=torch.bfloat16)
    for r in range(0, n_out, block):
        n = min(block, n_out - r)
        out[:, r:r + n] = product(xf, _upcast_block(w[r:r + n]))
    return out


def _upcast_block(w: torch.Tensor) -> torch.Tensor:
    """w in fp32, in this thread's scratch buffer (valid until the thread's next call). The buffer is an
    inference tensor, written in inference mode, so callers inside and outside inference mode can share it."""
    with torch.inference_mode():
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.numel() < w.numel():
            buf = _scratch.buf = torch.empty(w.numel(), dtype=torch.float32)
        return buf[:w.numel()].view(w.shape).copy_(w)
