"""Static-batch generation on one process: the in-process reference path every configuration is compared to."""

from __future__ import annotations

import torch

from .experts import can_overlap
from .layers import AttentionBatch, micro_batches
from .mixtral import Mixtral
from .sampling import SamplingParams, sample_batch


def generate(model: Mixtral, prompts: list[list[int]], params: SamplingParams, block_size: int = 16,
             return_logits: bool = False, overlap: bool = False) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill all prompts in one step, then decode them together; each stops at EOS/stop ids or max_tokens.
    overlap: steps of two or more sequences run as two micro-batches whose attention and remote experts
    overlap (`Mixtral.forward_ping_pong`), where the model's experts can (`can_overlap`).

    Returns the generated ids per prompt and, with return_logits, the fp32 logits [n, V] that chose them.
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    cfg = model.cfg
    limit = max(len(p) for p in prompts) + params.max_tokens
    if limit > cfg.max_position_embeddings:
        raise ValueError(f"max_tokens: prompt plus {params.max_tokens} new tokens exceeds the context "
                         f"({cfg.max_position_embeddings})")
    blocks_per_seq = (limit + block_size - 1) // block_size
    kv = model.new_kv_cache(len(prompts) * blocks_per_seq, block_size)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {cfg.eos_token_id})
    gens = [params.make_generator() for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    logits_out: list[list[torch.Tensor]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    lens = [len(p) for p in prompts]
    step_ids = [list(p) for p in prompts]
    while active:
        seqs = [(tables[i], lens[i], len(step_ids[i])) for i in active]
        ids = torch.tensor([t for i in active for t in step_ids[i]], dtype=torch.long, device=model.device)
        if overlap and len(active) > 1 and can_overlap(model.experts):
            parts, last_token = micro_batches(seqs, block_size, cfg.sliding_window, model.device)
            hidden = model.forward_ping_pong(ids, parts, kv)
        else:
            batch = AttentionBatch.build(seqs, block_size, cfg.sliding_window, model.device)
            hidden, last_token = model.forward(ids, batch, kv), batch.last_token
        logits = model.logits(hidden[last_token])
        chosen = sample_batch(logits, [params] * len(active), [gens[i] for i in active])
        failed = next((c for c in chosen if isinstance(c, str)), None)
        if failed is not None:
            raise ValueError(failed)
        still = []
        for row, (i, tok) in enumerate(zip(active, chosen, strict=True)):
            out[i].append(tok)
            if return_logits:
                logits_out[i].append(logits[row].cpu())
            lens[i] += 1
            step_ids[i] = [tok]
            if tok not in stops and len(out[i]) < params.max_tokens:
                still.append(i)
        active = still
    return out, [torch.stack(x) for x in logits_out] if return_logits else []
