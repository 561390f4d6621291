"""Loader: reads only what a filter keeps, opens only the shards that hold it, and names file and tensor on error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import MixtralConfig
from model.loader import CheckpointError, LoadStats, load_tensors
from model.weights import dense_filter, expected_shapes, experts_filter

from .hf_reference import write_hf_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    write_hf_checkpoint(d, seed=3, max_shard_size="100KB")
    return d


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_filter_reads_only_selected_tensors_and_shards(sharded):
    cfg = MixtralConfig.from_file(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    stats = LoadStats()
    got = load_tensors(sharded, cfg, experts_filter([(1, 3)]), stats=stats)
    assert sorted(got) == [f"model.layers.1.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")]
    assert stats.tensors_read == 3
    assert stats.bytes_read == 3 * cfg.hidden_size * cfg.intermediate_size * 4
    assert set(stats.files_opened) == {index[n] for n in got}
    assert len(set(index.values())) > len(stats.files_opened)


def test_dense_filter_skips_every_expert(sharded):
    cfg = MixtralConfig.from_file(sharded)
    got = load_tensors(sharded, cfg, dense_filter)
    assert got and not any(".experts." in n for n in got)
    assert set(got) == {n for n in expected_shapes(cfg) if ".experts." not in n}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_selectable(sharded, dtype):
    cfg = MixtralConfig.from_file(sharded)
    t = load_tensors(sharded, cfg, lambda n: n == "model.norm.weight", dtype=dtype)["model.norm.weight"]
    assert t.dtype == getattr(torch, dtype)


def test_missing_tensor_named(tmp_path, sharded):
    d = copy(sharded, tmp_path / "c")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        load_tensors(d, MixtralConfig.from_file(d))


def _rewrite_shard(d, name, edit):
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    path = d / idx[name]
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_unexpected_tensor_named(tmp_path, sharded):
    d = copy(sharded, tmp_path / "c")
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    shard = idx["weight_map"]["model.norm.weight"]
    _rewrite_shard(d, "model.norm.weight", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    idx["weight_map"]["model.extra.weight"] = shard
    idx_path.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"{shard}.*unexpected tensor 'model\.extra\.weight'"):
        load_tensors(d, MixtralConfig.from_file(d))


def test_shape_mismatch_named(tmp_path, sharded):
    d = copy(sharded, tmp_path / "c")
    name = "model.layers.1.block_sparse_moe.gate.weight"
    path = _rewrite_shard(d, name, lambda t: t.update({name: torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=rf"{path.name}.*'{name}' has shape \(3, 64\), config expects \(8, 64\)"):
        load_tensors(d, MixtralConfig.from_file(d))


def test_truncated_shard_named(tmp_path, sharded):
    d = copy(sharded, tmp_path / "c")
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    path = d / idx["model.embed_tokens.weight"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=path.name):
        load_tensors(d, MixtralConfig.from_file(d))


def test_corrupt_header_named(tmp_path, sharded):
    d = copy(sharded, tmp_path / "c")
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    path = d / idx["model.norm.weight"]
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=rf"{path.name}: not a readable safetensors file"):
        load_tensors(d, MixtralConfig.from_file(d), lambda n: n == "model.norm.weight")


def test_missing_shard_and_index(tmp_path, sharded):
    d = copy(sharded, tmp_path / "c")
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    (d / idx["model.norm.weight"]).unlink()
    with pytest.raises(CheckpointError, match="shard file not found"):
        load_tensors(d, MixtralConfig.from_file(d))
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_tensors(d, MixtralConfig.from_file(d))
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_tensors(d, MixtralConfig.from_file(d))
