"""Write a random-weight HF Mixtral checkpoint (sharded safetensors + tokenizer) for tests and benches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ConfigError, MixtralConfig
from .tokenizer import build_byte_level_bpe, write_tokenizer_files
from .weights import expected_shapes

_COMMON = {"model_type": "mixtral", "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
           "num_local_experts": 8, "num_experts_per_tok": 2, "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": False}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**_COMMON, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512},
    "bench": {**_COMMON, "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3584,
              "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
              "max_position_embeddings": 4096},
    "mixtral-8x7b": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 32768},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORCE_ABOVE_BYTES = 20 * 10**9  # larger checkpoints need force=True
DEFAULT_SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02
NORM_NOISE = 0.1
_OVERRIDABLE = {f.name for f in dataclasses.fields(MixtralConfig)} - {"torch_dtype"} | {"model_type"}


class CheckpointError(ValueError):
    """A write_checkpoint request that cannot be carried out; the message names the flag or path."""


def checkpoint_size_bytes(cfg: MixtralConfig, dtype: str | torch.dtype) -> int:
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise CheckpointError(f"dtype (--dtype): {dtype!r} is not one of {list(DTYPES)}")
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return sum(math.prod(s) for s in expected_shapes(cfg).values()) * dt.itemsize


def build_config(preset: str = "tiny", dtype: str = "float32", overrides: dict[str, Any] | None = None
                 ) -> MixtralConfig:
    """The preset's HF fields plus overrides, validated by MixtralConfig (bad values raise ConfigError)."""
    if preset not in PRESETS:
        raise CheckpointError(f"preset (--preset): unknown {preset!r}; expected one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype (--dtype): {dtype!r} is not one of {list(DTYPES)}")
    unknown = sorted(set(overrides or {}) - _OVERRIDABLE)
    if unknown:
        hint = " (use dtype)" if unknown[0] == "torch_dtype" else ""
        raise ConfigError(f"{unknown[0]}: not a Mixtral config field that can be overridden{hint}")
    return MixtralConfig.from_dict({**PRESETS[preset], **(overrides or {}), "torch_dtype": dtype})


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32",
                     router_skew: float = 0.0, force: bool = False, overrides: dict[str, Any] | None = None,
                     max_shard_bytes: int | None = None, single_file: bool = False) -> Path:
    """Write config, generation config, tokenizer and random safetensors weights into an empty `out_dir`."""
    cfg = build_config(preset, dtype, overrides)
    if not isinstance(router_skew, (int, float)) or router_skew < 0 or not math.isfinite(router_skew):
        raise CheckpointError(f"router_skew (--router-skew): must be a finite number >= 0, "
                              f"got {router_skew!r}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes (--max-shard-bytes): must be positive, got {max_shard_bytes}")
    shapes = expected_shapes(cfg)
    total = checkpoint_size_bytes(cfg, dtype)
    if total > FORCE_ABOVE_BYTES and not force:
        raise CheckpointError(f"preset {preset!r} in {dtype} is {total / 1e9:.1f} GB of random weights; "
                              "pass force=True (--force) to write it anyway")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not an empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out).free
        if total > free:
            raise CheckpointError(f"{out}: needs {total / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free")
        _write_all(out, cfg, shapes, total, seed, DTYPES[dtype], float(router_skew), max_shard_bytes,
                   single_file)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write checkpoint ({e.strerror or e})") from e
    return out


def _write_all(out: Path, cfg: MixtralConfig, shapes: dict[str, tuple[int, ...]], total: int, seed: int,
               dtype: torch.dtype, skew: float, max_shard_bytes: int | None, single_file: bool) -> None:
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer_files(out, build_byte_level_bpe(cfg.vocab_size, seed), cfg.bos_token_id, cfg.eos_token_id,
                          cfg.max_position_embeddings)
    init = _Init(cfg, seed, skew)
    if single_file:
        save_file({n: init.tensor(n, s).to(dtype) for n, s in shapes.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    limit = max_shard_bytes or min(DEFAULT_SHARD_BYTES, max(1, math.ceil(total / 2)))
    shards = list(_plan_shards(shapes, dtype.itemsize, limit))
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # One shard in memory at a time, so a full-size checkpoint streams to disk.
        save_file({n: init.tensor(n, shapes[n]).to(dtype) for n in names}, str(out / fname),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, limit: int) -> Iterator[list[str]]:
    """Greedy, in name order: a shard closes before the tensor that would push it past `limit` bytes."""
    cur: list[str] = []
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if cur and size + n > limit:
            yield cur
            cur, size = [], 0
        cur.append(name)
        size += n
    if cur:
        yield cur


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _randn(seed: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed_for(seed, key))
    return torch.randn(shape, generator=g, dtype=torch.float32)


class _Init:
    """Per-tensor seeded init, so a tensor's values do not depend on sharding or generation order.

    Router skew X > 0: every embedding row gets a shared unit direction u (as large as its random part), and
    layer l's gate row for the expert of rank r gets -X*log(r)*k along u, with the random part of the gate
    projected off u. After RMSNorm the u-term adds a per-expert bias to the router logits about X*log(r) times
    the spread of the random logits (/1.28, a Gumbel's std), so top-1 picks fall off roughly like r**-X.
    Ranks are a seeded permutation per layer, so each layer has different hot experts.
    """

    def __init__(self, cfg: MixtralConfig, seed: int, skew: float) -> None:
        self.cfg, self.seed, self.skew = cfg, seed, skew
        u = _randn(seed, "router_skew.direction", (cfg.hidden_size,))
        self.u = u / u.norm()

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        x = _randn(self.seed, name, shape)
        if name.endswith("norm.weight"):
            return 1.0 + NORM_NOISE * x
        x = x * INIT_STD
        if self.skew > 0 and name == "model.embed_tokens.weight":
            x += INIT_STD * math.sqrt(self.cfg.hidden_size) * self.u
        elif self.skew > 0 and name.endswith("block_sparse_moe.gate.weight"):
            layer = int(name.split(".")[2])
            x -= (x @ self.u)[:, None] * self.u  # random part orthogonal to u
            x += (INIT_STD / 1.28 * self.skew * self._bias(layer))[:, None] * self.u
        return x

    def _bias(self, layer: int) -> torch.Tensor:
        """-log(rank) per expert for `layer` (0 for the hottest expert)."""
        return -torch.log(expert_ranks(self.cfg.num_local_experts, self.seed, layer).float())


def expert_ranks(num_experts: int, seed: int, layer: int) -> torch.Tensor:
    """Rank (1 = hottest) of each expert of `layer` under router skew; a seeded permutation of 1..E."""
    g = torch.Generator().manual_seed(_seed_for(seed, f"router_skew.ranks.{layer}"))
    return torch.randperm(num_experts, generator=g) + 1
