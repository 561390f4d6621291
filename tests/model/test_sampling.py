"""Sampling judged against distributions: seeded draws through sample_one / sample_batch follow softmax(logits / T)
(chi-square), top_k and top_p cut the support to exactly the expected tokens, and T -> 0 is greedy."""

import collections

import pytest
import torch

from model.sampling import SamplingParams, sample_batch, sample_one

LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5])
N = 4000
P_MIN = 1e-3  # reject the sampler when its counts are this unlikely under the claimed distribution


def chi_square_p(counts: collections.Counter, probs: torch.Tensor) -> float:
    """P(X >= stat) for Pearson's chi-square over the tokens of nonzero probability (df = support - 1);
    the survival function is the regularized upper incomplete gamma Q(df/2, stat/2)."""
    support = [i for i in range(len(probs)) if probs[i] > 0]
    n = sum(counts.values())
    stat = sum((counts.get(i, 0) - n * float(probs[i])) ** 2 / (n * float(probs[i])) for i in support)
    df = len(support) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def draws_one(params: SamplingParams, n: int = N, seed: int = 0) -> collections.Counter:
    g = torch.Generator().manual_seed(seed)
    return collections.Counter(sample_one(LOGITS, params, g) for _ in range(n))


def draws_batch(params: SamplingParams, n: int = N, seed: int = 0) -> collections.Counter:
    """One batch of n identical rows, each with its own seeded generator."""
    rows = [SamplingParams(**{**params.__dict__, "seed": seed + i}) for i in range(n)]
    out = sample_batch(LOGITS.expand(n, -1).clone(), rows, [p.make_generator() for p in rows])
    return collections.Counter(out)


def top_p_support(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest most-likely prefix whose mass reaches top_p."""
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("draw", [draws_one, draws_batch], ids=["sample_one", "sample_batch"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_softmax_over_temperature(draw, temperature):
    counts = draw(SamplingParams(temperature=temperature))
    assert chi_square_p(counts, torch.softmax(LOGITS / temperature, -1)) > P_MIN


@pytest.mark.parametrize("temperature,wrong", [(0.5, 1.0), (1.0, 0.8), (1.7, 1.0)])
def test_the_chi_square_bound_rejects_the_wrong_temperature(temperature, wrong):
    """The check above can fail: the same draws are rejected against a nearby wrong temperature."""
    counts = draws_one(SamplingParams(temperature=temperature))
    assert chi_square_p(counts, torch.softmax(LOGITS / wrong, -1)) < P_MIN


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_support_is_exactly_the_k_most_likely(top_k):
    counts = draws_one(SamplingParams(temperature=1.0, top_k=top_k))
    expected = set(torch.topk(LOGITS, top_k).indices.tolist())
    assert set(counts) == expected
    probs = torch.softmax(LOGITS, -1)
    renormalized = torch.zeros_like(probs)
    renormalized[list(expected)] = probs[list(expected)] / probs[list(expected)].sum()
    if top_k > 1:
        assert chi_square_p(counts, renormalized) > P_MIN


@pytest.mark.parametrize("top_p", [0.25, 0.45, 0.77])
@pytest.mark.parametrize("draw", [draws_one, draws_batch], ids=["sample_one", "sample_batch"])
def test_top_p_support_is_exactly_the_nucleus(draw, top_p):
    temperature = 1.3
    probs = torch.softmax(LOGITS / temperature, -1)
    expected = top_p_support(probs, top_p)
    cum = torch.cumsum(torch.sort(probs, descending=True).values, 0)
    assert (cum - top_p).abs().min() > 0.02  # top_p is not on a boundary: the expected set is unambiguous
    counts = draw(SamplingParams(temperature=temperature, top_p=top_p))
    assert set(counts) == expected
    nucleus = torch.zeros_like(probs)
    nucleus[list(expected)] = probs[list(expected)] / probs[list(expected)].sum()
    if len(expected) > 1:
        assert chi_square_p(counts, nucleus) > P_MIN


def test_top_k_and_top_p_together():
    """top_k first, then the nucleus of what is left (renormalized)."""
    counts = draws_one(SamplingParams(temperature=1.0, top_k=4, top_p=0.7))
    probs4 = torch.softmax(LOGITS[:4], -1)  # LOGITS is sorted: the top 4 are ids 0..3
    assert set(counts) == top_p_support(probs4, 0.7)


@pytest.mark.parametrize("temperature", [0.0, 1e-6, 1e-3, 1e-2, 1e-300])
def test_temperature_towards_zero_is_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert draws_one(params, n=300) == {int(torch.argmax(LOGITS)): 300}
    assert draws_batch(params, n=300) == {int(torch.argmax(LOGITS)): 300}


def test_a_high_temperature_flattens_towards_uniform():
    counts = draws_one(SamplingParams(temperature=1e4))
    assert chi_square_p(counts, torch.full((len(LOGITS),), 1 / len(LOGITS))) > P_MIN


def test_same_seed_same_draws_other_seed_other_draws():
    params = SamplingParams(temperature=1.0)
    seq = [[sample_one(LOGITS, params, g) for _ in range(50)]
           for g in (torch.Generator().manual_seed(s) for s in (7, 7, 8))]
    assert seq[0] == seq[1] and seq[0] != seq[2]


def test_logit_bias_moves_the_distribution():
    params = SamplingParams(temperature=1.0, logit_bias=((7, 4.0), (0, -100.0)))
    biased = LOGITS.clone()
    biased[7] += 4.0
    biased[0] -= 100.0
    counts = draws_one(params)
    assert 0 not in counts
    assert chi_square_p(counts, torch.softmax(biased, -1)) > P_MIN


@pytest.mark.parametrize("greedy", [True, False])
def test_a_non_finite_row_fails_alone(greedy):
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 1.0, 0.0], [2.0, float("inf"), 0.0], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0 if greedy else 1.0, seed=1) for _ in range(4)]
    out = sample_batch(logits, params, [p.make_generator() for p in params])
    assert "non-finite logits for this request (1 NaN, 0 infinite of 3)" in out[1]
    assert "(0 NaN, 1 infinite of 3)" in out[2]
    if greedy:
        assert (out[0], out[3]) == (1, 0)
    assert all(isinstance(t, int) for t in (out[0], out[3]))


def test_finite_logits_whose_sum_overflows_are_sampled():
    big = torch.full((2, 4), 3e38)
    big[0, 2] = 3.1e38
    out = sample_batch(big, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert out == [2, 0]
