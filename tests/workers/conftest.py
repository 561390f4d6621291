"""A tiny HF-saved Mixtral checkpoint and the in-process reference for worker outputs."""

import pytest
import torch
import transformers

from model.config import MixtralConfig
from model.experts import ExpertWeights, run_grouped, sort_by_expert
from model.loader import load_tensors
from model.weights import expert_tensor_name, experts_filter

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).save_pretrained(d)
    return d


def reference_rows(model_dir, layer: int, hosted: list[int], tokens: int, dtype=torch.float32, seed: int = 0):
    """What the in-process path (LocalExperts: sort_by_expert + run_grouped over all experts of the layer)
    computes, restricted to the rows of the `hosted` experts: (expert_ids, counts, hidden rows, outputs)."""
    cfg = MixtralConfig.from_file(model_dir)
    E = cfg.num_local_experts
    t = load_tensors(model_dir, cfg, experts_filter([(layer, e) for e in range(E)]), dtype=dtype)
    experts = [ExpertWeights.from_hf(*(t[expert_tensor_name(layer, e, w)] for w in ("w1", "w3", "w2")))
               for e in range(E)]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype)
    k = cfg.num_experts_per_tok
    expert_ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    plan = sort_by_expert(expert_ids, E)
    x = hidden[plan.token]
    y = run_grouped(x, experts, plan.counts)
    mask = torch.isin(plan.expert, torch.tensor(hosted))
    ids = [e for e in range(E) if e in hosted and plan.counts[e]]
    return ids, [plan.counts[e] for e in ids], x[mask].contiguous(), y[mask]
