"""`linear` in each of its forms gives F.linear's result, for every row count the engine produces."""

import platform

import pytest
import torch
import torch.nn.functional as F

from model.experts import ExpertWeights, run_grouped
from model.matmul import (
    UPCAST_BLOCK_BYTES,
    PreparedWeight,
    candidates,
    is_packed,
    linear,
    onednn_fp32_available,
    prepare_weight,
    row_bucket,
    single_kernel_plan,
)

ROWS = (1, 2, 5, 6, 7, 15, 16, 33, 300)
KERNELS = [(d, c.name) for d in (torch.float32, torch.bfloat16) for c in candidates(d)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def prepared(w: torch.Tensor, kernel: str) -> PreparedWeight:
    return PreparedWeight.build(w, single_kernel_plan(w.dtype, tuple(w.shape), torch.get_num_threads(), kernel))


@pytest.mark.parametrize(("dtype", "kernel"), KERNELS)
@pytest.mark.parametrize("rows", ROWS)
def test_every_kernel_matches_the_fp32_product(dtype, kernel, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)
    p = prepared(w, kernel)
    assert is_packed(p) == (kernel == "onednn_packed") and torch.equal(p.to_dense(), w)
    assert p.shape == w.shape and p.dtype == dtype
    y = linear(x, p)
    assert y.shape == (rows, 96) and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, F.linear(x.float(), w.float())) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(linear(x, p), y)  # deterministic
    if kernel == "upcast":  # computed in fp32, rounded once
        assert torch.equal(y, _fp32_product(x, w).to(torch.bfloat16))


def test_prepared_weight_follows_its_plan():
    """prepare_weight picks this machine's plan; each row count runs the plan's kernel for its bucket."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 80, generator=g)
    p = prepare_weight(w)
    assert isinstance(p, PreparedWeight) and p.plan.shape == (96, 80) and p.plan.dtype == "float32"
    assert p.plan.threads == torch.get_num_threads()
    for rows in ROWS:
        x = torch.randn(rows, 80, generator=g)
        kernel = p.plan.kernel_for(row_bucket(rows))
        assert torch.equal(linear(x, p), linear(x, prepared(w, kernel)))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN fp32 is checked on x86 only")
def test_onednn_is_used_on_this_cpu():
    # x86 torch wheels carry oneDNN: the fast path must not silently fall back there.
    assert onednn_fp32_available()


def _fp32_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fp32 product with the whole weight at once, by the kernel `linear` uses."""
    x, w = x.float(), w.float()
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") if onednn_fp32_available() else F.linear(x, w)


def test_bf16_upcast_in_blocks_equals_whole_weight_product():
    """A weight several upcast blocks tall (plus a ragged last block) gives the same bits as one product."""
    k = 256
    n_out = 3 * (UPCAST_BLOCK_BYTES // (4 * k)) + 5
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n_out, k, generator=g).to(torch.bfloat16)
    x = torch.randn(9, k, generator=g).to(torch.bfloat16)
    assert torch.equal(linear(x, w), _fp32_product(x, w).to(torch.bfloat16))


def test_bf16_upcast_inside_and_outside_inference_mode():
    """The per-thread upcast buffer serves callers in and out of inference mode, in either order."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(6, 32, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        inside = linear(x, w)
    outside = linear(x, w)
    with torch.inference_mode():
        again = linear(x, w)
    assert torch.equal(inside, outside) and torch.equal(outside, again)


def test_other_dtypes_and_shapes_are_left_alone():
    w16 = torch.randn(8, 4).half()
    assert prepare_weight(w16) is w16
    w3d = torch.randn(2, 8, 4)
    assert prepare_weight(w3d) is w3d


def test_plain_weights_run_the_fixed_kernels():
    """A weight that never went through prepare_weight (a tied lm_head) runs the fixed plan's kernels."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    for rows in (1, 5, 6, 40):
        x = torch.randn(rows, 32, generator=g).to(torch.bfloat16)
        assert torch.equal(linear(x, w), linear(x, prepared(w, "upcast")))


@pytest.mark.parametrize(("dtype", "kernel"), KERNELS)
def test_grouped_rows_equal_rows_run_alone(dtype, kernel):
    """An expert's rows give the same bits whether they arrive with other experts' rows or alone: what makes
    the expert workers' outputs identical to the in-process path."""
    g = torch.Generator().manual_seed(7)
    D, inter = 64, 96
    experts = [ExpertWeights(prepared(torch.randn(2 * inter, D, generator=g).to(dtype), kernel),
                             prepared(torch.randn(D, inter, generator=g).to(dtype), kernel)) for _ in range(4)]
    counts = [5, 0, 13, 2]
    x = torch.randn(sum(counts), D, generator=g).to(dtype)
    y = run_grouped(x, experts, counts)
    assert torch.equal(y[5:18], run_grouped(x[5:18], [experts[2]], [13]))
    assert torch.equal(y[18:], run_grouped(x[18:], [experts[3]], [2]))


@pytest.mark.parametrize(("dtype", "kernel"), KERNELS)
def test_row_buckets_bound_the_shapes_onednn_sees(dtype, kernel):
    """oneDNN caches a primitive per product shape: serving's many row counts map to a few dozen buckets."""
    buckets = {row_bucket(n) for n in range(1, 513)}
    assert len(buckets) == 38 and all(row_bucket(n) >= n for n in range(1, 2000))
    assert row_bucket(16) == 16 and row_bucket(17) == 24 and row_bucket(65) == 80 and row_bucket(129) == 160
    assert row_bucket(513) == 640
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 80, generator=g).to(dtype)
    p = prepared(w, kernel)
    x = torch.randn(37, 80, generator=g).to(dtype)  # padded to 40 rows
    y = linear(x, p)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.shape == (37, 96) and y.is_contiguous() and rel_err(y, F.linear(x.float(), w.float())) < tol
    padded = torch.cat([x, torch.zeros(3, 80, dtype=dtype)])
    assert torch.equal(linear(padded, p)[:37], y)  # the same product as the bucket's
