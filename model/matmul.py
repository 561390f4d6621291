"""Weight products (`linear`) in the fastest form this process's device and dtype allow.

Measured on the 2-core AVX2 CPU (bench preset shapes, 8 experts streamed from DRAM, 1 and 2 threads):
- fp32: ATen's F.linear goes through MKL sgemm, which is 2-3x slower than oneDNN when x has a few rows,
  worst for odd row counts (15 rows: 89 ms vs 31 ms per layer of experts). So fp32 weights are reordered
  once, at load, into oneDNN's blocked layout (`prepare_weight`) and run with oneDNN's inner product; large
  row counts (prefill) run as fast as with MKL.
- bf16: without native bf16 (no AVX512-BF16/AMX) oneDNN has no bf16 inner product, and ATen emulates bf16
  GEMMs ~1 ms per row per expert. Below BF16_CPU_UPCAST_ROWS rows that is still the fastest (the product is
  memory-bound); from there on the product runs in fp32 through oneDNN and is rounded back to bf16. The
  weight is upcast UPCAST_BLOCK_BYTES of fp32 at a time into a reused per-thread buffer, so the fp32 copy
  stays in cache instead of making a round trip through DRAM (10-25% faster, most with several processes).
On CUDA, and for other dtypes, `linear` is F.linear and weights stay as they are.

oneDNN keeps a primitive (JIT kernel and descriptors, ~0.75 MiB) per distinct product shape, up to 1024 of
them. Serving sends every row count from 1 to the step's token budget (decode batches, prefill chunks, expert
groups), so a process grew by hundreds of MiB over a 30-minute soak, one new row count at a time. Its products
therefore run on row counts rounded up to `row_bucket` (zero rows appended, the result sliced): a few dozen
shapes per weight, all seen within the first minute of serving.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

BF16_CPU_UPCAST_ROWS = 6
# oneDNN picks its blocked weight layout for an expected row count; measured fine from 1 to 1024 rows.
PACK_ROWS_HINT = 16
UPCAST_BLOCK_BYTES = 4 << 20
_scratch = threading.local()  # .buf: this thread's fp32 buffer for upcast weight blocks


@functools.cache
def onednn_fp32_available() -> bool:
    """Whether oneDNN's fp32 inner product (plain and reordered weights) runs on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 8)
        x = torch.ones(2, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
        ok = all(torch.equal(_onednn(x, p), F.linear(x, w)) for p in (w, packed))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return ok


def row_bucket(n: int) -> int:
    """The row count a product of n rows runs with: n up to 16, then multiples of 16 up to 128, of 32 up to
    512 and of 128 beyond (at most 15, 31 or 127 padded rows; 35 buckets up to 512 rows)."""
    if n <= 16:
        return n
    step = 16 if n <= 128 else 32 if n <= 512 else 128
    return -(-n // step) * step


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    b = row_bucket(n)
    if b != n:
        padded = x.new_zeros(b, x.shape[1])
        padded[:n] = x
        return torch.ops.mkldnn._linear_pointwise(padded, w, None, "none", [], "")[:n]
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def is_packed(w: torch.Tensor) -> bool:
    return w.layout == torch._mkldnn


def prepare_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` [out, in] in the layout `linear` is fastest with: oneDNN's blocked layout for fp32 on CPU (an
    opaque tensor: `linear` reads it, `.to_dense()` undoes it), otherwise `w` itself."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and onednn_fp32_available():
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS_HINT)
    return w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ w [out, in].T -> [N, out] (no bias); `w` plain or from `prepare_weight`.

    Deterministic for a given (rows, weight, thread count): every caller that computes the same rows with
    the same weights gets bit-identical results.
    """
    if is_packed(w):
        return _onednn(x.contiguous(), w)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= BF16_CPU_UPCAST_ROWS:
        return _upcast_linear(x, w)
    return F.linear(x, w)


def _upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 x @ bf16 w.T computed in fp32 and rounded to bf16, upcasting w one cache-sized block of rows at a time."""
    n_out, k = w.shape
    block = min(n_out, max(16, UPCAST_BLOCK_BYTES // (4 * k)))
    xf = x.float().contiguous()
    product = _onednn if onednn_fp32_available() else F.linear
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
