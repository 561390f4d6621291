"""Safetensors loader for HF Mixtral checkpoints: single file or sharded with an index.

It reads only the tensors a filter keeps and opens only the shards that hold them, and every problem is an
error that names the file and the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import MixtralConfig
from .weights import TensorFilter, all_filter, expected_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read; names the file and tensor."""


@dataclass
class LoadStats:
    tensors_read: int = 0
    bytes_read: int = 0
    files_opened: list[str] = field(default_factory=list)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(set(DTYPES))}") from None


def weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            raw = json.loads(index.read_text())
            mapping = raw["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(mapping, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        return mapping
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    with _open(single) as f:
        return {name: SINGLE_FILE for name in f.keys()}


def load_tensors(model_dir: str | Path, cfg: MixtralConfig, keep: TensorFilter = all_filter,
                 dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                 stats: LoadStats | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors that `keep` selects, checked against the config, cast to `dtype`."""
    model_dir = Path(model_dir)
    dtype = parse_dtype(dtype)
    stats = stats if stats is not None else LoadStats()
    shapes = expected_shapes(cfg)
    mapping = weight_map(model_dir)
    unexpected = sorted(set(mapping) - set(shapes))
    if unexpected:
        raise CheckpointError(f"{model_dir / mapping[unexpected[0]]}: unexpected tensor {unexpected[0]!r} "
                              f"(not in a Mixtral checkpoint of this config; {len(unexpected)} such)")
    wanted = [n for n in shapes if keep(n)]
    missing = [n for n in wanted if n not in mapping]
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(mapping[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        path = model_dir / fname
        stats.files_opened.append(fname)
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: missing tensor {name!r} (the index says it is here)")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != shapes[name]:
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, config expects "
                                          f"{shapes[name]}")
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, RuntimeError, ValueError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None
                if not t.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected a float")
                stats.tensors_read += 1
                stats.bytes_read += t.numel() * t.element_size()
                out[name] = t.to(device=device, dtype=dtype, copy=True)  # own aligned memory, not the mmap
    return out


def _open(path: Path):
    if not path.exists():
        raise CheckpointError(f"{path}: shard file not found")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
