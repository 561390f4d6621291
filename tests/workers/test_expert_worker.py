"""ExpertWorker: loads only its own tensors, matches the in-process grouped path bit for bit, and names
every bad request."""

import threading

import pytest
import torch

from model.experts import run_grouped
from workers.expert_worker import ExpertWorker

from .conftest import reference_rows

PAIRS = [(0, 1), (1, 3), (1, 5), (1, 6)]


@pytest.fixture(scope="module")
def worker(mixtral_dir):
    return ExpertWorker(str(mixtral_dir), PAIRS, worker_id="wt")


def test_loads_only_its_own_tensors(worker):
    D, I = 64, 128
    assert worker.load_stats.tensors_read == len(PAIRS) * 3
    assert worker.load_stats.bytes_read == len(PAIRS) * 3 * D * I * 4
    assert worker.load_stats.files_opened == ["model.safetensors"]
    assert sorted(worker.experts) == PAIRS


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bit_identical_to_in_process_path(mixtral_dir, dtype):
    w = ExpertWorker(str(mixtral_dir), PAIRS, dtype=dtype)
    ids, counts, x, want = reference_rows(mixtral_dir, 1, [3, 5, 6], tokens=40, dtype=w.dtype)
    got = w.forward(1, ids, counts, x)
    assert got.dtype == w.dtype and got.device.type == "cpu"
    assert torch.equal(got, want)
    assert w.stats.tokens == {(1, e): n for e, n in zip(ids, counts, strict=True)}
    assert w.stats.compute_seconds > 0


def test_any_expert_order_and_zero_counts(worker):
    x = torch.randn(5, 64)
    a = worker.forward(1, [6, 3], [2, 3], x)
    b = worker.forward(1, [3, 6], [0, 2], x[:2])
    assert torch.equal(a[:2], b)


@pytest.mark.parametrize("args, match", [
    ((5, [3], [2], torch.zeros(2, 64)), r"layer 5 is not hosted here \(hosted layers: \[0, 1\]\)"),
    ((1, [2], [2], torch.zeros(2, 64)), r"expert 2 of layer 1 is not hosted here \(hosted: \[3, 5, 6\]\)"),
    ((0, [3], [2], torch.zeros(2, 64)), "expert 3 of layer 0 is not hosted"),
    ((1, [3, 5], [2], torch.zeros(2, 64)), "2 expert_ids but 1 counts"),
    ((1, [3, 3], [1, 1], torch.zeros(2, 64)), "duplicate expert ids"),
    ((1, [3], [3], torch.zeros(2, 64)), "counts sum to 3, but hidden has 2 rows"),
    ((1, [3], [0], torch.zeros(0, 64)), "empty request"),
    ((1, [3], [2], torch.zeros(2, 32)), r"shape \[2, 32\], expected \[N, 64\]"),
    ((1, [3], [2], torch.zeros(2, 2, 64)), "expected \\[N, 64\\]"),
    ((1, [3], [2], torch.zeros(2, 64, dtype=torch.bfloat16)),
     "dtype torch.bfloat16, worker wt runs torch.float32"),
    ((1, [3], [-1], torch.zeros(0, 64)), "negative count"),
])
def test_bad_requests_raise_value_error(worker, args, match):
    with pytest.raises(ValueError, match=match):
        worker.forward(*args)


@pytest.mark.parametrize("pairs", [[], [(2, 0)], [(0, 8)], [(0, 1), (0, 1)]])
def test_bad_pairs(mixtral_dir, pairs):
    with pytest.raises(ValueError, match="pairs must be|outside the model"):
        ExpertWorker(str(mixtral_dir), pairs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cuda_falls_back_to_cpu_without_a_gpu(mixtral_dir):
    assert ExpertWorker(str(mixtral_dir), [(0, 0)], device="cuda").device.type == "cpu"


def test_add_and_drop_experts_while_serving(mixtral_dir):
    w = ExpertWorker(str(mixtral_dir), [(1, 3)], worker_id="wa")
    read = w.load_stats.tensors_read
    assert w.add_experts([(1, 3), (1, 5), (0, 2)]) == [(0, 2), (1, 5)]  # (1, 3) is already here
    assert w.load_stats.tensors_read == read + 2 * 3  # only the new pairs' tensors were read
    assert w.pairs == [(0, 2), (1, 3), (1, 5)] and w.layers == [0, 1]
    ids, counts, x, want = reference_rows(mixtral_dir, 1, [3, 5], tokens=30)
    assert torch.equal(w.forward(1, ids, counts, x), want)
    # A forward that already took its experts finishes even if they are dropped meanwhile.
    experts, _ = w._check(1, ids, counts, x)
    assert w.drop_experts([(1, 5), (1, 7)]) == [(1, 5)]
    assert torch.equal(run_grouped(x, experts, counts), want)
    with pytest.raises(ValueError, match="expert 5 of layer 1 is not hosted"):
        w.forward(1, ids, counts, x)
    with pytest.raises(ValueError, match="would leave no expert"):
        w.drop_experts([(0, 2), (1, 3)])
    with pytest.raises(ValueError, match="outside the model"):
        w.add_experts([(0, 9)])
    assert w.pairs == [(0, 2), (1, 3)]


def test_forwards_on_one_thread_while_another_adds_and_drops(mixtral_dir):
    w = ExpertWorker(str(mixtral_dir), [(1, 3), (1, 5)])
    ids, counts, x, want = reference_rows(mixtral_dir, 1, [3, 5], tokens=20)
    stop, errors = threading.Event(), []

    def churn():
        while not stop.is_set():
            w.add_experts([(0, 1), (0, 2)])
            w.drop_experts([(0, 1), (0, 2)])

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(50):
            if not torch.equal(w.forward(1, ids, counts, x), want):
                errors.append("mismatch")
    finally:
        stop.set()
        t.join()
    assert errors == []


@pytest.mark.parametrize("mode", ["grouped_mm", "padded"])
def test_stacked_experts_mode(mixtral_dir, mode):
    """The GPU default (one grouped product per weight over the layer's stacked experts), run here on CPU:
    the in-process results to rounding, in any request order, through add and drop (restacking only the
    layers that changed), with the experts views into the stack."""
    w = ExpertWorker(str(mixtral_dir), [(1, 3), (1, 5), (0, 2)], worker_id="ws", experts_impl=mode)
    assert w.experts_impl == mode
    ids, counts, x, want = reference_rows(mixtral_dir, 1, [3, 5, 6], tokens=30)
    sub = [i for i, e in enumerate(ids) if e in (3, 5)]
    rows = torch.cat([x[sum(counts[:i]):sum(counts[:i + 1])] for i in sub])
    out = torch.cat([want[sum(counts[:i]):sum(counts[:i + 1])] for i in sub])
    kept_layer0 = w._hosted[2][0]
    torch.testing.assert_close(w.forward(1, [ids[i] for i in sub], [counts[i] for i in sub], rows), out,
                               rtol=1e-5, atol=1e-5)
    assert w.add_experts([(1, 6)]) == [(1, 6)]
    assert w._hosted[2][0] is kept_layer0 and w._hosted[2][1][0] == (3, 5, 6)  # only layer 1 restacked
    torch.testing.assert_close(w.forward(1, ids, counts, x), want, rtol=1e-5, atol=1e-5)
    (stack_ids, stack) = w._hosted[2][1]
    assert w.experts[(1, 5)].w13.untyped_storage().data_ptr() == stack.w13.untyped_storage().data_ptr()
    a = w.forward(1, [6, 3], [2, 3], x[:5])  # not in stack order: the per-expert loop, same rows
    b = w.forward(1, [3, 6], [3, 2], torch.cat([x[2:5], x[:2]]))
    torch.testing.assert_close(a, torch.cat([b[3:], b[:3]]), rtol=1e-5, atol=1e-5)
    assert w.drop_experts([(1, 3)]) == [(1, 3)] and w._hosted[2][1][0] == (5, 6)
    with pytest.raises(ValueError, match="expert 3 of layer 1 is not hosted"):
        w.forward(1, [3], [1], x[:1])
    with pytest.raises(ValueError, match="experts_impl: expected auto, per_expert, grouped_mm, padded"):
        ExpertWorker(str(mixtral_dir), [(0, 1)], experts_impl="loop")
