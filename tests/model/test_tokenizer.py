import json

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from model.tokenizer import (
    CHAT_TEMPLATE,
    IncrementalDecoder,
    Tokenizer,
    _top_up,
    build_byte_level_bpe,
    write_tokenizer_files,
)

TEXTS = [
    "Hello world, please explain the router.",
    "  Leading spaces, trailing spaces  \n\nand new lines\t tabs.",
    "Numbers 12345 and punctuation!?; (brackets) \"quotes\" it's",
    "Ünïcode: naïve café, 日本語, emoji 🙂👍🏽",
    "[INST] looks like a control token [/INST]",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a story about a router."}],
    [{"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
     {"role": "user", "content": [{"type": "text", "text": "part one"},
                                  {"type": "text", "text": "part two"}]},
     {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, build_byte_level_bpe(512), bos_token_id=1, eos_token_id=2, model_max_length=512)
    return d


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.mark.parametrize("size", [259, 260, 300, 512, 1000, 32000])
def test_exact_vocab_size_and_layout(size):
    tok = build_byte_level_bpe(size)
    assert tok.get_vocab_size(with_added_tokens=True) == size
    vocab = tok.get_vocab(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(size))
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert {tok.id_to_token(i) for i in range(3, 259)} == set(pre_tokenizers.ByteLevel.alphabet())


def test_deterministic_per_seed():
    assert build_byte_level_bpe(600, seed=1).to_str() == build_byte_level_bpe(600, seed=1).to_str()
    assert build_byte_level_bpe(600, seed=1).to_str() != build_byte_level_bpe(600, seed=2).to_str()


def test_top_up_reaches_exact_size():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    merges = []
    _top_up(vocab, merges, 300)
    assert len(vocab) == 300 and sorted(vocab.values()) == list(range(300))
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_matches_hf(ours, hf, text):
    ids = ours.encode(text)
    assert ids[0] == ours.bos_token_id == 1
    assert ours.decode(ids) == text
    assert ours.encode(text, add_bos=False) == ids[1:]
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_hf_loads_files_unchanged(tok_dir, ours, hf):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["add_bos_token"] is True
    assert (tok_dir / "special_tokens_map.json").exists()
    assert len(hf) == ours.vocab_size == 512
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_render_chat_format(ours):
    msgs = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert ours.render_chat(msgs) == "<s>[INST] Sys\n\nu1 [/INST]a1</s>[INST] u2 [/INST]"


@pytest.mark.parametrize("msgs", CHATS)
def test_chat_template_matches_hf(ours, hf, msgs):
    assert hf.apply_chat_template(msgs, tokenize=False) == ours.render_chat(msgs)
    enc = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    hf_ids = enc["input_ids"] if not isinstance(enc, list) else enc
    assert ours.apply_chat_template(msgs) == list(hf_ids)
    assert ours.apply_chat_template(msgs).count(ours.bos_token_id) == 1


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "system", "content": "s"}, {"role": "system", "content": "t"}], "role 'system'"),
    ([{"role": "tool", "content": "a"}], "role 'tool'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text"),
    ([{"role": "user", "content": 3}], "content"),
    ([], "non-empty"),
])
def test_chat_errors(ours, hf, msgs, match):
    with pytest.raises(ValueError, match=match):
        ours.apply_chat_template(msgs)
    if msgs and msgs[0]["role"] != "tool" and not isinstance(msgs[0]["content"], int):
        with pytest.raises(Exception):  # noqa: B017 - HF raises jinja's TemplateError
            hf.apply_chat_template(msgs, tokenize=False)


def test_incremental_decoder(ours):
    text = "Streaming ünïcode 日本語 and emoji 🙂👍🏽 works, word by word."
    prompt = ours.encode("Prompt:")
    ids = ours.encode(text, add_bos=False)
    dec = IncrementalDecoder(ours, prompt_ids=prompt)
    pieces = [dec.step(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert sum(1 for p in pieces if p) > 5


def test_from_dir_ids_and_errors(tmp_path, tok_dir):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    tok = Tokenizer.from_dir(tmp_path)  # no configs: falls back to the token strings
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [0, 2]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 0)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
