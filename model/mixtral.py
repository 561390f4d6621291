"""The Mixtral decoder with an injected expert backend.

Shapes: T new tokens in a step (all sequences flattened), D hidden, H query heads, KVH kv heads, hd head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import MixtralConfig
from .experts import ExpertBackend, ExpertWeights, LocalExperts, SplitExpertBackend
from .grouped_experts import GroupedExperts, StackedLayer, resolve_experts_impl
from .layers import AttentionBatch, apply_rope, paged_attention, rms_norm, rope_cos_sin, rope_inv_freq, route
from .loader import LoadStats, load_tensors, parse_dtype
from .matmul import linear, prepare_weight
from .weights import all_filter, dense_filter, expert_tensor_name


@dataclass(frozen=True)
class LayerWeights:
    ln_attn: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2 KVH) hd, D], as prepare_weight lays it out (so is wo)
    wo: torch.Tensor  # [D, H hd]
    ln_moe: torch.Tensor  # [D]
    gate: torch.Tensor  # [E, D]


@dataclass
class KVCache:
    """Paged KV storage: per layer [num_blocks * block_size, KVH, hd]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    num_blocks: int

    @staticmethod
    def allocate(cfg: MixtralConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> KVCache:
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
                       v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
                       block_size=block_size, num_blocks=num_blocks)

    @staticmethod
    def bytes_per_block(cfg: MixtralConfig, block_size: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * item


class Mixtral:
    """Embeddings, attention, gating, norms and lm_head; the expert FFNs go through `experts`."""

    def __init__(self, cfg: MixtralConfig, tensors: dict[str, torch.Tensor], experts: ExpertBackend):
        self.cfg = cfg
        self.experts = experts
        self.embed = tensors["model.embed_tokens.weight"]
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.norm = tensors["model.norm.weight"]
        # tied: lm_head shares the embedding (plain layout, for F.embedding) rather than hold a second copy
        self.lm_head = self.embed if cfg.tie_word_embeddings else prepare_weight(tensors["lm_head.weight"])
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            wqkv = torch.cat([tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
            self.layers.append(LayerWeights(
                ln_attn=tensors[p + "input_layernorm.weight"], wqkv=prepare_weight(wqkv),
                wo=prepare_weight(tensors[p + "self_attn.o_proj.weight"]),
                ln_moe=tensors[p + "post_attention_layernorm.weight"],
                gate=tensors[p + "block_sparse_moe.gate.weight"]))
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(self.device)
        self.scale = cfg.head_dim ** -0.5

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", experts: ExpertBackend | None = None,
                        stats: LoadStats | None = None, experts_impl: str = "auto") -> Mixtral:
        """Load the checkpoint; without `experts`, the expert FFNs load too and run in-process, as
        experts_impl says: "per_expert" (`LocalExperts`: each expert's product by this CPU's measured kernel
        plan), "grouped_mm" or "padded" (`GroupedExperts`: stacked weights, no host sync), or "auto":
        per_expert on CPU, the device's grouped default elsewhere (GPU)."""
        impl = resolve_experts_impl(experts_impl, torch.device(device), parse_dtype(dtype))
        cfg = MixtralConfig.from_file(model_dir)
        keep = all_filter if experts is None else dense_filter
        tensors = load_tensors(model_dir, cfg, keep, dtype=parse_dtype(dtype), device=device, stats=stats)
        if experts is None:
            experts = cls._local_experts(cfg, tensors, impl)
        return cls(cfg, tensors, experts)

    @staticmethod
    def _local_experts(cfg: MixtralConfig, tensors: dict[str, torch.Tensor], impl: str) -> ExpertBackend:
        """The in-process backend (impl: per_expert or a GroupedExperts mode) over the checkpoint's expert
        tensors, popped from `tensors` a layer at a time, so stacking them holds one extra layer at most."""
        layers = []
        for i in range(cfg.num_hidden_layers):
            hf = [tuple(tensors.pop(expert_tensor_name(i, e, w)) for w in ("w1", "w3", "w2"))
                  for e in range(cfg.num_local_experts)]
            layers.append([ExpertWeights.from_hf(*ws) for ws in hf] if impl == "per_expert"
                          else StackedLayer.from_hf(hf))
        if impl == "per_expert":
            return LocalExperts(layers)
        return GroupedExperts(layers, impl)

    def new_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        return KVCache.allocate(self.cfg, num_blocks, block_size, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv: KVCache) -> torch.Tensor:
        """input_ids [T] -> final-normed hidden states [T, D]; writes the new tokens' K/V into `kv`."""
        x = F.embedding(input_ids, self.embed)  # [T, D]
        cos_sin = rope_cos_sin(batch.positions, self.inv_freq, x.dtype)
        for i in range(len(self.layers)):
            x = self._attention(i, x, batch, cos_sin, kv)
            h, weights, expert_ids = self._route(i, x)
            x = x + self.experts(i, h, expert_ids, weights)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def forward_ping_pong(self, input_ids: torch.Tensor, parts: list[AttentionBatch], kv: KVCache) -> torch.Tensor:
        """`forward` over micro-batches (`parts`: each one's AttentionBatch, their tokens consecutive in
        input_ids), overlapped: while the expert workers run one part's layer, this process runs the next
        part's attention (MegaScale-Infer's ping-pong). Needs a `SplitExpertBackend`. Each part's rows equal
        `forward` on that part alone; [T, D] in input_ids order."""
        experts: SplitExpertBackend = self.experts  # type: ignore[assignment]
        sizes = [int(p.positions.shape[0]) for p in parts]
        xs = list(F.embedding(input_ids, self.embed).split(sizes))
        cos_sin = [rope_cos_sin(p.positions, self.inv_freq, xs[0].dtype) for p in parts]
        pending: list[object | None] = [None] * len(parts)
        after_attn: list[torch.Tensor] = list(xs)
        try:
            for i in range(len(self.layers)):
                for j, part in enumerate(parts):
                    if pending[j] is not None:  # this part's previous layer: its experts ran meanwhile
                        xs[j] = after_attn[j] + experts.wait(pending[j])
                        pending[j] = None
                    after_attn[j] = self._attention(i, xs[j], part, cos_sin[j], kv)
                    h, weights, expert_ids = self._route(i, after_attn[j])
                    pending[j] = experts.submit(i, h, expert_ids, weights, first_part=j == 0)
            for j in range(len(parts)):
                xs[j] = after_attn[j] + experts.wait(pending[j])
                pending[j] = None
        finally:
            for handle in pending:
                if handle is not None:
                    experts.cancel(handle)
        return rms_norm(torch.cat(xs), self.norm, self.cfg.rms_norm_eps)

    def _attention(self, i: int, x: torch.Tensor, batch: AttentionBatch, cos_sin, kv: KVCache) -> torch.Tensor:
        """x [T, D] -> x + attention of layer i (K/V of the new tokens written into `kv`)."""
        cfg, lw = self.cfg, self.layers[i]
        H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = cos_sin
        h = rms_norm(x, lw.ln_attn, cfg.rms_norm_eps)
        q, k, v = linear(h, lw.wqkv).split([H * hd, KVH * hd, KVH * hd], dim=-1)
        q = apply_rope(q.view(-1, H, hd), cos, sin)
        k = apply_rope(k.view(-1, KVH, hd), cos, sin)
        attn = paged_attention(q, k, v.view(-1, KVH, hd), kv.k[i], kv.v[i], batch, self.scale)
        return x + linear(attn, lw.wo)

    def _route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE input of layer i and its routing: (h [T, D], weights [T, k], expert_ids [T, k])."""
        lw = self.layers[i]
        h = rms_norm(x, lw.ln_moe, self.cfg.rms_norm_eps)
        weights, expert_ids = route(F.linear(h, lw.gate), self.cfg.num_experts_per_tok)
        return h, weights, expert_ids

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> fp32 logits [N, V]."""
        return linear(hidden, self.lm_head).float()
