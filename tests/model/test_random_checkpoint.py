import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import MixtralForCausalLM

from model.config import ConfigError, MixtralConfig
from model.random_checkpoint import (
    PRESETS,
    build_config,
    checkpoint_size_bytes,
    expert_ranks,
    write_checkpoint,
)
from model.tokenizer import Tokenizer
from model.weights import expected_shapes


def read_all(path):
    """{name: tensor} over model.safetensors or every shard named in the index."""
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(path / f))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", seed=0)


def test_files_and_index_consistent(tiny):
    cfg = MixtralConfig.from_file(tiny)
    assert cfg == build_config("tiny") and cfg.torch_dtype == "float32"
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        assert (tiny / f).is_file(), f
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert shards == sorted(p.name for p in tiny.glob("model-*.safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    shapes = expected_shapes(cfg)
    assert set(index["weight_map"]) == set(shapes)
    total = 0
    for shard in shards:
        with safe_open(tiny / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard
                t = f.get_tensor(name)
                assert tuple(t.shape) == shapes[name] and t.dtype == torch.float32
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total == checkpoint_size_bytes(cfg, "float32")
    tok = Tokenizer.from_dir(tiny)
    assert tok.vocab_size == cfg.vocab_size == 512


def test_init_statistics(tiny):
    sd = read_all(tiny)
    emb, norm = sd["model.embed_tokens.weight"], sd["model.layers.0.input_layernorm.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    assert abs(norm.mean().item() - 1) < 0.05 and 0.05 < norm.std().item() < 0.15


def test_deterministic_per_seed_and_independent_of_sharding(tmp_path, tiny):
    a = read_all(tiny)
    b = read_all(write_checkpoint(tmp_path / "same", seed=0, single_file=True))
    c = read_all(write_checkpoint(tmp_path / "other", seed=1, max_shard_bytes=100_000))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "same" / "model.safetensors").exists()
    assert not (tmp_path / "same" / "model.safetensors.index.json").exists()


def test_max_shard_bytes(tmp_path):
    path = write_checkpoint(tmp_path / "ck", max_shard_bytes=100_000)
    files = sorted(path.glob("model-*.safetensors"))
    assert len(files) > 10
    for f in files:
        with safe_open(f, "pt") as sf:
            names = list(sf.keys())
            size = sum(sf.get_tensor(n).numel() * 4 for n in names)
        assert size <= 100_000 or len(names) == 1


def test_hf_loads_with_no_missing_keys(tiny):
    model, info = MixtralForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = read_all(tiny)
    assert torch.equal(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    ids = Tokenizer.from_dir(tiny).encode("Hello world")
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("overrides", [
    {"num_local_experts": 4, "num_experts_per_tok": 1, "head_dim": 32, "sliding_window": 64},
    {"tie_word_embeddings": True, "num_key_value_heads": 4},
])
def test_overrides_load_in_hf(tmp_path, overrides):
    path = write_checkpoint(tmp_path / "ck", overrides=overrides, router_skew=1.0)
    cfg = MixtralConfig.from_file(path)
    for k, v in overrides.items():
        assert getattr(cfg, k) == v
    assert set(read_all(path)) == set(expected_shapes(cfg))
    _, info = MixtralForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_bf16(tmp_path):
    path = write_checkpoint(tmp_path / "ck", dtype="bfloat16")
    assert MixtralConfig.from_file(path).torch_dtype == "bfloat16"
    sd = read_all(path)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    total = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == sum(t.numel() * 2 for t in sd.values())
    assert total == checkpoint_size_bytes(build_config("tiny"), "bfloat16")


def test_presets_and_sizes():
    big = build_config("mixtral-8x7b")
    shape = (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.head_dim,
             big.num_key_value_heads)
    assert shape == (4096, 14336, 32, 128, 8)
    assert big.sliding_window is None and big.rope_theta == 1e6 and big.max_position_embeddings == 32768
    assert 46e9 < checkpoint_size_bytes(big, "bfloat16") / 2 < 47e9  # Mixtral-8x7B has 46.7B parameters
    bench = build_config("bench")
    assert (bench.hidden_size, bench.num_hidden_layers, bench.vocab_size) == (1024, 8, 32000)
    assert set(PRESETS) >= {"tiny", "bench", "mixtral-8x7b"}


def test_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        write_checkpoint(tmp_path / "full")
    with pytest.raises(ValueError, match="preset"):
        write_checkpoint(tmp_path / "a", preset="huge")
    with pytest.raises(ValueError, match="dtype"):
        write_checkpoint(tmp_path / "a", dtype="int8")
    with pytest.raises(ValueError, match="router.skew"):
        write_checkpoint(tmp_path / "a", router_skew=-1)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        write_checkpoint(tmp_path / "a", overrides={"num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="not_a_field"):
        write_checkpoint(tmp_path / "a", overrides={"not_a_field": 1})
    with pytest.raises(ValueError, match=r"186\.8 GB") as e:
        write_checkpoint(tmp_path / "a", preset="mixtral-8x7b")
    assert "force" in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file"):
        write_checkpoint(tmp_path / "file" / "sub")
    assert not (tmp_path / "a").exists()


def test_cli(tmp_path, capsys):
    from cluster.cli import main

    argv = ["checkpoint", "--out", str(tmp_path / "ck"), "--dtype", "float16", "--router-skew", "0.5"]
    assert main(argv) == 0
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    assert {str(t.dtype) for t in read_all(tmp_path / "ck").values()} == {"torch.float16"}
    assert main(argv) == 2
    assert "not an empty directory" in capsys.readouterr().err


def top1_counts(path, layer=0):
    """Top-1 expert per vocab row, routing the RMS-normed embedding through layer `layer`'s gate."""
    sd, cfg = read_all(path), MixtralConfig.from_file(path)
    x = sd["model.embed_tokens.weight"]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    x = x * sd[f"model.layers.{layer}.input_layernorm.weight"]
    logits = F.linear(x, sd[f"model.layers.{layer}.block_sparse_moe.gate.weight"])
    return torch.bincount(logits.argmax(-1), minlength=cfg.num_local_experts)


def test_router_skew(tmp_path):
    flat = top1_counts(write_checkpoint(tmp_path / "flat"))
    skewed = top1_counts(write_checkpoint(tmp_path / "skew", router_skew=1.5))
    n, experts = flat.sum().item(), len(flat)
    assert flat.max().item() / n < 2 / experts
    assert skewed.max().item() / n > 3 / experts  # Zipf(1.5) over 8 experts would give ~0.52
    # The hot expert is the rank-1 one, and popularity falls with rank.
    ranks = expert_ranks(experts, seed=0, layer=0)
    by_rank = skewed[ranks.argsort()].float()
    assert by_rank[0] == skewed.max()
    assert by_rank[:2].sum() > by_rank[-4:].sum() * 2
    assert math.isclose(by_rank.sum().item(), n)
