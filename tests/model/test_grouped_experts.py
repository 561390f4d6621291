"""The stacked, sync-free expert path (the GPU default), run here on CPU: against HF, against the per-expert
path, and on the meta device, where any read of a tensor's data back to the host raises."""

import pytest
import torch

from model.experts import ExpertWeights, LocalExperts
from model.generation import generate
from model.grouped_experts import MODES, GroupedExperts, StackedLayer, default_mode
from model.layers import AttentionBatch
from model.mixtral import Mixtral
from model.sampling import SamplingParams

from .hf_reference import assert_rows_close, hf_greedy, hf_logits, write_hf_checkpoint

RTOL = 1e-5
VARIANTS = {"default": {}, "top1": dict(num_experts_per_tok=1),
            "top3_of_6": dict(num_local_experts=6, num_experts_per_tok=3), "sliding": dict(sliding_window=7)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"grouped-{request.param}")
    return d, write_hf_checkpoint(d, seed=11 + len(request.param), **VARIANTS[request.param])


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_logits_and_greedy_tokens_match_hf(checkpoint, mode):
    d, hf = checkpoint
    ours = Mixtral.from_pretrained(d, experts_impl=mode)
    assert isinstance(ours.experts, GroupedExperts) and ours.experts.mode == mode
    ids = prompt(24, 0)
    batch = AttentionBatch.build([([0, 1], len(ids), len(ids))], 16, ours.cfg.sliding_window)
    logits = ours.logits(ours.forward(torch.tensor(ids), batch, ours.new_kv_cache(2, 16)))
    assert_rows_close(logits, hf_logits(hf, ids), RTOL)
    ids = prompt(12, 2)
    out, _ = generate(ours, [ids, prompt(5, 3)], SamplingParams(max_tokens=24, ignore_eos=True))
    assert out[0] == hf_greedy(hf, ids, 24)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_same_mix_as_per_expert_path(mode, tokens):
    """Random weights and routing, experts left without rows included (few tokens over 8 experts)."""
    g = torch.Generator().manual_seed(tokens)
    E, D, inter, k = 8, 32, 48, 2
    hf = [(torch.randn(inter, D, generator=g), torch.randn(inter, D, generator=g), torch.randn(D, inter, generator=g))
          for _ in range(E)]
    hidden = torch.randn(tokens, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
    ref = LocalExperts([[ExpertWeights.from_hf(*w) for w in hf]])(0, hidden, ids, weights)
    got = GroupedExperts([StackedLayer.from_hf(hf)], mode)(0, hidden, ids, weights)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode,dtype", [("grouped_mm", "bfloat16"), ("padded", "float32"), ("padded", "bfloat16")])
def test_forward_never_reads_back_to_the_host(tmp_path, mode, dtype):
    """Meta tensors have no data: bincount, .tolist(), .item(), boolean-mask indexing and any other op whose
    output depends on values raise there. A whole forward (prefill and decode, several sequences) completing on
    meta is a forward that queues on a GPU without waiting for it."""
    write_hf_checkpoint(tmp_path, seed=3)
    model = Mixtral.from_pretrained(tmp_path, dtype=dtype, device="meta", experts_impl=mode)
    kv = model.new_kv_cache(4, 16)
    for seqs in ([([0, 1], 20, 20), ([2, 3], 7, 7)], [([0, 1], 21, 1), ([2, 3], 8, 1)]):
        batch = AttentionBatch.build(seqs, 16, None, device="meta")
        ids = torch.zeros(int(batch.positions.shape[0]), dtype=torch.long, device="meta")
        logits = model.logits(model.forward(ids, batch, kv)[batch.last_token])
        assert logits.shape == (2, model.cfg.vocab_size) and logits.device.type == "meta"


def test_per_expert_path_does_read_back(tmp_path):
    """The meta check catches a host read: the per-expert CPU path needs the counts on the host."""
    write_hf_checkpoint(tmp_path, seed=3)
    model = Mixtral.from_pretrained(tmp_path, device="meta", experts_impl="per_expert")
    batch = AttentionBatch.build([([0], 4, 4)], 16, None, device="meta")
    with pytest.raises(NotImplementedError):
        model.forward(torch.zeros(4, dtype=torch.long, device="meta"), batch, model.new_kv_cache(1, 16))


def test_choice_of_implementation(tmp_path):
    write_hf_checkpoint(tmp_path, seed=3)
    assert isinstance(Mixtral.from_pretrained(tmp_path).experts, LocalExperts)  # CPU: measured kernel plans
    assert default_mode(torch.device("cpu"), torch.float32) == "grouped_mm"
    assert default_mode(torch.device("meta"), torch.bfloat16) == "padded"
    with pytest.raises(ValueError, match="experts_impl: expected auto, per_expert, grouped_mm, padded; got 'x'"):
        Mixtral.from_pretrained(tmp_path, experts_impl="x")
    with pytest.raises(ValueError, match="mode: expected one of grouped_mm, padded"):
        GroupedExperts([StackedLayer(torch.zeros(2, 4, 2), torch.zeros(2, 2, 2))], "loop")
