"""HF Mixtral tensor names and shapes, and filters that pick the tensors one process needs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .config import MixtralConfig

TensorFilter = Callable[[str], bool]

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def expert_tensor_name(layer: int, expert: int, which: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{which}.weight"


def parse_expert_name(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, 'w1'|'w2'|'w3') for an expert tensor name, else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def expected_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Mixtral checkpoint holds, with its shape, named exactly as HF does."""
    D, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * hd, D)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_key_value_heads * hd, D)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_key_value_heads * hd, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, cfg.num_attention_heads * hd)
        shapes[p + "block_sparse_moe.gate.weight"] = (cfg.num_local_experts, D)
        for e in range(cfg.num_local_experts):
            shapes[expert_tensor_name(i, e, "w1")] = (I, D)
            shapes[expert_tensor_name(i, e, "w3")] = (I, D)
            shapes[expert_tensor_name(i, e, "w2")] = (D, I)
    return shapes


def dense_filter(name: str) -> bool:
    """Everything but the expert FFNs: what the attention-plus-router process needs."""
    return parse_expert_name(name) is None


def all_filter(name: str) -> bool:
    return True


def experts_filter(pairs: Iterable[tuple[int, int]]) -> TensorFilter:
    """Only the FFN tensors of the given (layer, expert) pairs: what one expert worker needs."""
    wanted = frozenset(pairs)

    def keep(name: str) -> bool:
        parsed = parse_expert_name(name)
        return parsed is not None and (parsed[0], parsed[1]) in wanted

    return keep
