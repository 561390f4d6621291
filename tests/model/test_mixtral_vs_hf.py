"""Our in-process Mixtral against HF transformers' MixtralForCausalLM on the same safetensors checkpoint."""

import pytest
import torch

from model.generation import generate
from model.layers import AttentionBatch
from model.mixtral import Mixtral
from model.sampling import SamplingParams

from .hf_reference import assert_close, hf_greedy, hf_logits, write_hf_checkpoint

VARIANTS = {
    "default": {},
    "top1": dict(num_experts_per_tok=1),
    "top3_of_6": dict(num_local_experts=6, num_experts_per_tok=3),
    "experts4": dict(num_local_experts=4),
    "gqa1": dict(num_key_value_heads=4),
    "gqa4": dict(num_key_value_heads=1),
    "head_dim": dict(head_dim=32),
    "sliding": dict(sliding_window=7),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = write_hf_checkpoint(d, seed=len(request.param), **VARIANTS[request.param])
    return hf, Mixtral.from_pretrained(d)


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def test_prefill_logits_match(pair):
    hf, ours = pair
    ids = prompt(24)
    kv = ours.new_kv_cache(2, 16)
    batch = AttentionBatch.build([([0, 1], len(ids), len(ids))], 16, ours.cfg.sliding_window)
    logits = ours.logits(ours.forward(torch.tensor(ids), batch, kv))
    assert_close(logits, hf_logits(hf, ids))


def test_decode_through_kv_cache_matches(pair):
    """Token by token through the KV cache, each step's logits equal HF's full-sequence logits."""
    hf, ours = pair
    ids = prompt(20, seed=1)
    ref = hf_logits(hf, ids)
    kv = ours.new_kv_cache(3, 8)
    table = [2, 0, 1]  # non-contiguous blocks on purpose
    for t in range(len(ids)):
        batch = AttentionBatch.build([(table, t + 1, 1)], 8, ours.cfg.sliding_window)
        step = ours.logits(ours.forward(torch.tensor([ids[t]]), batch, kv))
        assert_close(step[0], ref[t])


def test_greedy_32_tokens_identical(pair):
    hf, ours = pair
    ids = prompt(12, seed=2)
    out, _ = generate(ours, [ids], SamplingParams(max_tokens=32, ignore_eos=True))
    assert out[0] == hf_greedy(hf, ids, 32)


def test_batched_generation_equals_one_at_a_time(pair):
    _, ours = pair
    prompts = [prompt(n, seed=n) for n in (3, 17, 9, 30)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    together, _ = generate(ours, prompts, params)
    alone = [generate(ours, [p], params)[0][0] for p in prompts]
    assert together == alone


def test_bf16_loading_close_to_hf_bf16(tmp_path):
    hf = write_hf_checkpoint(tmp_path, seed=5)
    ours = Mixtral.from_pretrained(tmp_path, dtype="bfloat16")
    assert ours.embed.dtype == torch.bfloat16 and ours.layers[0].wqkv.dtype == torch.bfloat16
    ids = prompt(16, seed=3)
    ref = hf_logits(hf.to(torch.bfloat16), ids)
    kv = ours.new_kv_cache(1, 16)
    logits = ours.logits(ours.forward(torch.tensor(ids), AttentionBatch.build([([0], 16, 16)], 16, None), kv))
    assert_close(logits, ref, rtol=5e-2)


def test_sharded_and_single_file_load_the_same(tmp_path):
    write_hf_checkpoint(tmp_path / "single", seed=7)
    write_hf_checkpoint(tmp_path / "sharded", seed=7, max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    a, b = Mixtral.from_pretrained(tmp_path / "single"), Mixtral.from_pretrained(tmp_path / "sharded")
    ids = prompt(10)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert generate(a, [ids], params, return_logits=True)[1][0].equal(
        generate(b, [ids], params, return_logits=True)[1][0])


def test_expertmesh_checkpoint_matches_hf(tmp_path):
    """A checkpoint written by `expertmesh checkpoint` (sharded, our tokenizer) gives HF's logits."""
    import transformers

    from model.random_checkpoint import write_checkpoint
    from model.tokenizer import Tokenizer

    d = write_checkpoint(tmp_path / "ck", "tiny", seed=5, router_skew=1.0)
    hf = transformers.MixtralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours = Mixtral.from_pretrained(d)
    ids = Tokenizer.from_dir(d).encode("The router sends each token to two experts.")
    kv = ours.new_kv_cache(4, 16)
    logits = ours.logits(ours.forward(torch.tensor(ids), AttentionBatch.build([([0, 1, 2, 3], len(ids), len(ids))],
                                                                              16, None), kv))
    assert_close(logits, hf_logits(hf, ids))
    out, _ = generate(ours, [ids], SamplingParams(max_tokens=16, ignore_eos=True))
    assert out[0] == hf_greedy(hf, ids, 16)
