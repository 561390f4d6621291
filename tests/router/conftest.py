"""The tiny HF Mixtral (random weights, saved by transformers) that the API and hostile-input tests serve."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from model.mixtral import Mixtral
from model.tokenizer import Tokenizer, build_byte_level_bpe, write_tokenizer_files

TINY_VOCAB, TINY_MAX_LEN = 512, 512


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_mixtral")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=8, num_experts_per_tok=2,
                                     max_position_embeddings=TINY_MAX_LEN)
    transformers.MixtralForCausalLM(cfg).save_pretrained(d)
    write_tokenizer_files(d, build_byte_level_bpe(TINY_VOCAB), 1, 2, TINY_MAX_LEN)
    return d


@pytest.fixture(scope="session")
def model(model_dir):
    return Mixtral.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


EOS_AFTER = 6  # the EOS checkpoint's greedy continuation of CHAIN[0]: CHAIN[1..EOS_AFTER], then EOS
CHAIN = (40, 41, 97, 300, 12, 256, 73)  # EOS_AFTER + 1 distinct token ids, none of them BOS/EOS


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    """A tiny checkpoint (model.random_checkpoint, then edited) whose greedy output after CHAIN[0] is exactly
    CHAIN[1:], then EOS. Attention and expert outputs are zeroed (o_proj, w2), so the residual stream is the
    current token's embedding: a bigram model. CHAIN[i]'s embedding is the unit vector e_i, and lm_head maps
    e_i to CHAIN[i + 1] (to EOS for the last one) by a wide margin over every other token."""
    from safetensors.torch import load_file, save_file

    from model.random_checkpoint import write_checkpoint

    d = write_checkpoint(tmp_path_factory.mktemp("eos") / "ck", "tiny", seed=0, single_file=True)
    path = d / "model.safetensors"
    t = load_file(str(path))
    cfg = json.loads((d / "config.json").read_text())
    eos = cfg["eos_token_id"]
    for name in t:
        if name.endswith("self_attn.o_proj.weight") or name.endswith(".w2.weight"):
            t[name] = torch.zeros_like(t[name])
    embed, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    hidden = embed.shape[1]
    for i, tok_id in enumerate(CHAIN):
        embed[tok_id] = torch.nn.functional.one_hot(torch.tensor(i), hidden).float()
        nxt = CHAIN[i + 1] if i + 1 < len(CHAIN) else eos
        head[nxt, i] = 1.0  # after RMSNorm e_i is ~sqrt(hidden) * e_i: this logit ~8, random ones ~0.2
    save_file(t, str(path), metadata={"format": "pt"})
    return d
