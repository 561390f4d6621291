"""HF transformers' MixtralForCausalLM as the judge: write checkpoints and compute reference logits."""

from __future__ import annotations

import torch
import transformers

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
             sliding_window=None)


def write_hf_checkpoint(out_dir, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A random MixtralForCausalLM saved by HF itself (safetensors); returns the HF model in fp32 eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(**{**SMALL, **overrides})
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # HF init leaves norms at 1; perturb them so the norm weights are exercised
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """Relative to the reference's scale: max |ours - ref| <= rtol * max |ref|."""
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol} x {scale:.3e}"


def assert_rows_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Every position (row) on its own: max |ours - ref| <= rtol * max |ref| of that row (the README's claim:
    fp32 logits match HF within 1e-5 relative)."""
    ours, ref = ours.float().reshape(-1, ref.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    err = (ours - ref).abs().max(-1).values
    scale = ref.abs().max(-1).values
    worst = int(torch.argmax(err / scale))
    assert bool((err <= rtol * scale).all()), \
        f"position {worst}: max abs error {err[worst]:.3e} > {rtol} x {scale[worst]:.3e}"
