"""Mixtral's layers as plain functions over tensors: RMSNorm, RoPE, gating, GQA attention over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] -> [T, D]; statistics in fp32, as HF does."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [T] -> cos, sin [T, 1, head_dim] in the activation dtype."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gating exactly as HF Mixtral: softmax over all experts in fp32, top-k, renormalize.

    router_logits [T, E] -> (weights [T, k] fp32, expert_ids [T, k] int64)
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


@dataclass(frozen=True)
class AttentionBatch:
    """Where a step's T new tokens sit: B sequences, each with q_len_b new tokens after ctx_b - q_len_b cached.

    Tokens are laid out sequence by sequence. Padded views let one SDPA call cover mixed prefill and decode.
    """

    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] flat KV slot (block * block_size + offset) each new token writes
    q_index: torch.Tensor  # [B, Qmax] row in T of each padded query (0 where padding)
    q_rows: torch.Tensor  # [T] flat index (b * Qmax + i) of each new token in the padded [B, Qmax] view
    kv_slots: torch.Tensor  # [B, Lmax] flat KV slots of each sequence's whole context (0 where padding)
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True where a query may attend
    last_token: torch.Tensor  # [B] row in T of each sequence's last new token

    @staticmethod
    def build(seqs: list[tuple[list[int], int, int]], block_size: int, sliding_window: int | None,
              device: torch.device | str = "cpu") -> AttentionBatch:
        """seqs: (block_table, context_len_after_step, q_len) per sequence."""
        B = len(seqs)
        qmax = max(q for _, _, q in seqs)
        lmax = max(c for _, c, _ in seqs)
        positions, slots, last = [], [], []
        q_index = torch.zeros(B, qmax, dtype=torch.long)
        q_valid = torch.zeros(B, qmax, dtype=torch.bool)
        kv_slots = torch.zeros(B, lmax, dtype=torch.long)
        q_pos = torch.full((B, qmax), -1, dtype=torch.long)
        kv_len = torch.zeros(B, dtype=torch.long)
        row = 0
        for b, (table, ctx, q) in enumerate(seqs):
            blocks = torch.tensor(table[: (ctx + block_size - 1) // block_size], dtype=torch.long)
            ctx_slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)[:ctx]
            kv_slots[b, :ctx] = ctx_slots
            kv_len[b] = ctx
            start = ctx - q
            positions.append(torch.arange(start, ctx))
            slots.append(ctx_slots[start:])
            q_index[b, :q] = torch.arange(row, row + q)
            q_valid[b, :q] = True
            q_pos[b, :q] = torch.arange(start, ctx)
            row += q
            last.append(row - 1)
        k_pos = torch.arange(lmax)[None, None, :]
        qp = q_pos[:, :, None]
        mask = (k_pos <= qp) & (k_pos < kv_len[:, None, None])
        if sliding_window is not None:
            mask &= (qp - k_pos) < sliding_window
        mask |= (~q_valid)[:, :, None] & (k_pos == 0)  # padded query rows attend one key: no NaN rows
        return AttentionBatch(
            positions=torch.cat(positions).to(device), slot_mapping=torch.cat(slots).to(device),
            q_index=q_index.to(device), q_rows=q_valid.reshape(-1).nonzero().squeeze(1).to(device),
            kv_slots=kv_slots.to(device),
            mask=mask[:, None].to(device), last_token=torch.tensor(last, dtype=torch.long, device=device))


def micro_batches(seqs: list[tuple[list[int], int, int]], block_size: int, sliding_window: int | None,
                  device: torch.device | str = "cpu") -> tuple[list[AttentionBatch], torch.Tensor]:
    """Two AttentionBatches over the sequences' halves (cut where their new tokens are closest to equal; each
    sequence whole, order kept) for `Mixtral.forward_ping_pong`, and each sequence's last new token's row in
    the whole step [B] (as AttentionBatch.last_token). Needs at least two sequences."""
    if len(seqs) < 2:
        raise ValueError("micro-batches need at least two sequences")
    q = [n for _, _, n in seqs]
    total, before, cut, gap = sum(q), 0, 1, None
    for k in range(1, len(seqs)):
        before += q[k - 1]
        if gap is None or abs(total - 2 * before) < gap:
            cut, gap = k, abs(total - 2 * before)
    parts = [AttentionBatch.build(seqs[:cut], block_size, sliding_window, device),
             AttentionBatch.build(seqs[cut:], block_size, sliding_window, device)]
    first = parts[0].positions.shape[0]
    return parts, torch.cat([parts[0].last_token, parts[1].last_token + first])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [T, H, hd], k/v [T, KVH, hd] for the new tokens; caches [slots, KVH, hd] (written in place).

    Returns the attention output [T, H * hd].
    """
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    T, H, hd = q.shape
    qp = q[batch.q_index].transpose(1, 2)  # [B, H, Qmax, hd]
    kp = k_cache[batch.kv_slots].transpose(1, 2)  # [B, KVH, Lmax, hd]
    vp = v_cache[batch.kv_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=batch.mask, scale=scale,
                                         enable_gqa=kp.shape[1] != H)
    B, Qmax = batch.q_index.shape
    # [T, H, hd] in token order, by an index built on the host (a boolean mask would read back to the host on a GPU)
    out = out.transpose(1, 2).reshape(B * Qmax, H, hd)[batch.q_rows]
    return out.reshape(T, H * hd)
