"""Mixtral configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("mixtral",)


class ConfigError(ValueError):
    """A config.json that expertmesh cannot serve; the message names the field."""


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "bfloat16"

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MixtralConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type: {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if raw.get(k) is None]
        if missing:
            raise ConfigError(f"{missing[0]}: required field is missing")
        heads = _positive_int(raw, "num_attention_heads")
        hidden = _positive_int(raw, "hidden_size")
        kv_heads = _positive_int(raw, "num_key_value_heads", default=heads)
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"hidden_size: {hidden} is not divisible by num_attention_heads={heads}")
            head_dim = hidden // heads
        head_dim = _positive_int({"head_dim": head_dim}, "head_dim")
        if head_dim % 2:
            raise ConfigError(f"head_dim: {head_dim} must be even for rotary embeddings")
        if heads % kv_heads:
            raise ConfigError(f"num_key_value_heads: {kv_heads} does not divide num_attention_heads={heads}")
        experts = _positive_int(raw, "num_local_experts", default=8)
        top_k = _positive_int(raw, "num_experts_per_tok", default=2)
        if top_k > experts:
            raise ConfigError(f"num_experts_per_tok: {top_k} is larger than num_local_experts={experts}")
        rope_theta = raw.get("rope_theta")
        rope_params = raw.get("rope_parameters") or raw.get("rope_scaling")
        if rope_theta is None and isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta")
        if isinstance(rope_params, dict) and rope_params.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"rope_parameters.rope_type: {rope_params.get('rope_type')!r} is not supported")
        rope_theta = float(rope_theta if rope_theta is not None else 1e6)
        if rope_theta <= 0:
            raise ConfigError(f"rope_theta: {rope_theta} must be positive")
        window = raw.get("sliding_window")
        if window is not None:
            window = _positive_int(raw, "sliding_window")
        eps = float(raw.get("rms_norm_eps", 1e-5))
        if eps <= 0:
            raise ConfigError(f"rms_norm_eps: {eps} must be positive")
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            vocab_size=_positive_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(raw, "intermediate_size"),
            num_hidden_layers=_positive_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=_positive_int(raw, "max_position_embeddings", default=32768),
            rms_norm_eps=eps,
            rope_theta=rope_theta,
            sliding_window=window,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=int(raw.get("bos_token_id", 1) if raw.get("bos_token_id") is not None else 1),
            eos_token_id=int(eos if eos is not None else 2),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> MixtralConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that HF transformers' MixtralForCausalLM reads."""
        d = asdict(self)
        d.update(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_act="silu",
                 attention_dropout=0.0, initializer_range=0.02, output_router_logits=False,
                 router_aux_loss_coef=0.02, router_jitter_noise=0.0, use_cache=True)
        return d


def _positive_int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value
