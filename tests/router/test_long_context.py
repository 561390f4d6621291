"""Long context: a checkpoint whose max_position_embeddings is 32768, prefilled in engine-sized chunks, has HF's
logits at every position (HF in one forward, SDPA without a materialized T x T mask), and the server takes a
prompt of that length (max_model_len 32768, a KV budget that fits it) and answers HF's greedy token.

The 8k case runs by default; the 32k case is marked slow (about a minute on 2 shared cores): `pytest -m slow`.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from model.layers import AttentionBatch
from model.mixtral import Mixtral
from model.tokenizer import Tokenizer, build_byte_level_bpe, write_tokenizer_files
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.scheduler import EngineConfig
from router.server import HttpThread
from tests.model.hf_reference import write_hf_checkpoint

MAX_POS, V, BLOCK, CHUNK = 32768, 300, 16, 512  # CHUNK: the engine's default max_num_batched_tokens
LENGTHS = [8192, pytest.param(32768 - 8, marks=pytest.mark.slow, id="32k")]  # 32k leaves room for the answer
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             num_local_experts=4, num_experts_per_tok=2, vocab_size=V, max_position_embeddings=MAX_POS,
             attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("long_ctx")
    hf = write_hf_checkpoint(d, seed=3, **SMALL)
    write_tokenizer_files(d, build_byte_level_bpe(V), 1, 2, MAX_POS)
    return d, hf, Mixtral.from_pretrained(d)


@pytest.fixture(scope="module", params=LENGTHS)
def long(request, ckpt):
    """(n, a seeded n-token prompt, HF's fp32 logits at every position: one forward, once per n)."""
    n, hf = request.param, ckpt[1]
    ids = torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    with torch.no_grad():
        return n, ids, hf(torch.tensor([ids])).logits[0].float()


def test_chunked_prefill_logits_equal_hf(ckpt, long):
    ours, (n, ids, ref) = ckpt[2], long
    blocks = -(-n // BLOCK)
    kv, table = ours.new_kv_cache(blocks, BLOCK), list(range(blocks))[::-1]  # non-contiguous blocks on purpose
    rows = []
    for start in range(0, n, CHUNK):  # each chunk attends to everything cached before it, as the engine runs it
        end = min(n, start + CHUNK)
        batch = AttentionBatch.build([(table, end, end - start)], BLOCK, None)
        rows.append(ours.logits(ours.forward(torch.tensor(ids[start:end]), batch, kv)))
    logits = torch.cat(rows)
    err, scale = (logits - ref).abs().max(-1).values, ref.abs().max(-1).values
    worst = int(torch.argmax(err / scale))
    assert bool((err <= 1e-4 * scale).all()), f"position {worst}: {err[worst]:.3e} vs scale {scale[worst]:.3e}"


def test_server_answers_a_long_prompt_with_hf_greedy_token(ckpt, long):
    (d, _, ours), (n, ids, ref) = ckpt, long
    cfg = EngineConfig(num_kv_blocks=-(-(n + 8) // BLOCK), block_size=BLOCK, max_num_batched_tokens=CHUNK)
    engine = AsyncEngine(Engine(ours, cfg))
    assert engine.engine.max_model_len == MAX_POS  # the checkpoint's context; the KV cache holds this request
    http = HttpThread(build_app(engine, Tokenizer.from_dir(d), "long"), "127.0.0.1", 0, graceful_s=0.1,
                      log_level="critical")
    url = f"http://127.0.0.1:{http.start(timeout_s=10)}"
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            card = c.get("/v1/models").json()["data"][0]
            assert card["max_model_len"] == MAX_POS
            r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1})
            assert r.status_code == 200, r.text
            out = r.json()
            beyond = c.post("/v1/completions", json={"prompt": ids + ids[:16], "max_tokens": 1})  # past the KV budget
            assert beyond.status_code == 400 and beyond.json()["error"]["param"] in ("prompt", "max_tokens")
    finally:
        http.stop()
        engine.shutdown(drain=False)
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
    assert out["choices"][0]["finish_reason"] == "length"
    lp = torch.log_softmax(ref[-1], -1)
    token_text = next(iter(out["choices"][0]["logprobs"]["top_logprobs"][0]))
    assert Tokenizer.from_dir(d).decode([int(lp.argmax())], skip_special_tokens=False) == token_text
    assert out["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(float(lp.max()), abs=1e-4)
