"""Config from HF config.json: the variants real checkpoints use, and errors that name the field."""

import json

import pytest

from model.config import ConfigError, MixtralConfig

BASE = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
        "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2}


def cfg(**kw):
    return MixtralConfig.from_dict({**BASE, **kw})


def test_mixtral_8x7b_fields():
    c = cfg()
    assert (c.head_dim, c.num_experts, c.top_k, c.sliding_window, c.rope_theta) == (128, 8, 2, None, 1e6)


def test_rope_theta_inside_rope_parameters():
    raw = {k: v for k, v in BASE.items() if k != "rope_theta"}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert MixtralConfig.from_dict(raw).rope_theta == 5e5


def test_head_dim_absent_null_or_explicit():
    assert cfg(head_dim=None).head_dim == 128
    assert cfg(head_dim=64).head_dim == 64


def test_sliding_window_tie_and_expert_counts():
    c = cfg(sliding_window=4096, tie_word_embeddings=True, num_local_experts=16, num_experts_per_tok=4)
    assert (c.sliding_window, c.tie_word_embeddings, c.num_experts, c.top_k) == (4096, True, 16, 4)


def test_eos_list_takes_first():
    assert cfg(eos_token_id=[2, 7]).eos_token_id == 2


@pytest.mark.parametrize("kw, field", [
    (dict(model_type="llama"), "model_type"),
    (dict(num_key_value_heads=5), "num_key_value_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_size=4001), "hidden_size"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(vocab_size="big"), "vocab_size"),
    (dict(num_local_experts=0), "num_local_experts"),
    (dict(head_dim=33), "head_dim"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4}), "rope_parameters.rope_type"),
])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        cfg(**kw)


def test_missing_required_field():
    raw = dict(BASE)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="^hidden_size: required"):
        MixtralConfig.from_dict(raw)


def test_from_file_errors_name_path(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        MixtralConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MixtralConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config.json: model_type"):
        MixtralConfig.from_file(tmp_path)


def test_round_trip_through_hf_dict():
    c = cfg(sliding_window=128, head_dim=64)
    assert MixtralConfig.from_dict(c.to_hf_dict()) == c
