"""`linear` in each of its forms gives F.linear's result, for every row count the engine produces."""

import platform

import pytest
import torch
import torch.nn.functional as F

from model.experts import ExpertWeights, run_grouped
from model.matmul import (
    BF16_CPU_UPCAST_ROWS,
    UPCAST_BLOCK_BYTES,
    is_packed,
    linear,
    onednn_fp32_available,
    prepare_weight,
    row_bucket,
)

ROWS = (1, 2, 5, 6, 7, 15, 16, 33, 300)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("rows", ROWS)
def test_fp32_prepared_weight_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    x = torch.randn(rows, 80, generator=g)
    p = prepare_weight(w)
    assert is_packed(p) == onednn_fp32_available()
    y = linear(x, p)
    assert y.shape == (rows, 96) and y.dtype == torch.float32 and y.is_contiguous()
    assert rel_err(y, F.linear(x, w)) < 1e-5
    assert torch.equal(linear(x, p), y)  # deterministic
    assert torch.equal(p.to_dense() if is_packed(p) else p, w)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN fp32 is checked on x86 only")
def test_onednn_is_used_on_this_cpu():
    # x86 torch wheels carry oneDNN: the fast path must not silently fall back there.
    assert onednn_fp32_available()


@pytest.mark.parametrize("rows", ROWS)
def test_bf16_matches_fp32_reference(rows):
    g = torch.Generator().manual_seed(100 + rows)
    w = torch.randn(96, 80, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 80, generator=g).to(torch.bfloat16)
    assert prepare_weight(w) is w  # bf16 stays plain
    y = linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
    ref = F.linear(x.float(), w.float())
    assert rel_err(y, ref) < 1e-2
    if rows >= BF16_CPU_UPCAST_ROWS:  # computed in fp32, rounded once
        assert torch.equal(y, _fp32_product(x, w).to(torch.bfloat16))


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
    x = torch.randn(BF16_CPU_UPCAST_ROWS + 3, k, generator=g).to(torch.bfloat16)
    assert torch.equal(linear(x, w), _fp32_product(x, w).to(torch.bfloat16))


def test_bf16_upcast_inside_and_outside_inference_mode():
    """The per-thread upcast buffer serves callers in and out of inference mode, in either order."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(BF16_CPU_UPCAST_ROWS, 32, generator=g).to(torch.bfloat16)
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


def test_grouped_rows_equal_rows_run_alone():
    """An expert's rows give the same bits whether they arrive with other experts' rows or alone: what makes
    the expert workers' outputs identical to the in-process path."""
    g = torch.Generator().manual_seed(7)
    D, inter = 64, 96
    experts = [ExpertWeights.from_hf(torch.randn(inter, D, generator=g), torch.randn(inter, D, generator=g),
                                     torch.randn(D, inter, generator=g)) for _ in range(4)]
    counts = [5, 0, 13, 2]
    x = torch.randn(sum(counts), D, generator=g)
    y = run_grouped(x, experts, counts)
    assert torch.equal(y[5:18], run_grouped(x[5:18], [experts[2]], [13]))
    assert torch.equal(y[18:], run_grouped(x[18:], [experts[3]], [2]))


def test_row_buckets_bound_the_shapes_onednn_sees():
    """oneDNN caches a primitive per product shape: serving's many row counts map to a few dozen buckets."""
    buckets = {row_bucket(n) for n in range(1, 513)}
    assert len(buckets) == 35 and all(row_bucket(n) >= n for n in range(1, 2000))
    assert row_bucket(16) == 16 and row_bucket(17) == 32 and row_bucket(129) == 160 and row_bucket(513) == 640
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 80, generator=g)
    p = prepare_weight(w)
    x = torch.randn(37, 80, generator=g)  # padded to 48 rows
    y = linear(x, p)
    assert y.shape == (37, 96) and y.is_contiguous() and rel_err(y, F.linear(x, w)) < 1e-5
    padded = torch.cat([x, torch.zeros(11, 80)])
    assert torch.equal(linear(padded, p)[:37], y)  # the same product as the bucket's
