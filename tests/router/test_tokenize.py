"""/tokenize and /detokenize (vLLM's shapes) and /v1/models' max_model_len, on a live uvicorn server."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.tokenizer import Tokenizer
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.scheduler import EngineConfig
from router.server import HttpThread

MODEL, KEY = "tiny-tok", "tok-secret"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = write_checkpoint(tmp_path_factory.mktemp("tok_tiny"), "tiny", 0, "float32")
    tok = Tokenizer.from_dir(d)
    engine = AsyncEngine(Engine(Mixtral.from_pretrained(d), EngineConfig(num_kv_blocks=64)))
    http = HttpThread(build_app(engine, tok, MODEL, api_key=KEY), "127.0.0.1", 0, graceful_s=0.1,
                      log_level="critical")
    url = f"http://127.0.0.1:{http.start(timeout_s=10)}"
    client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    yield SimpleNamespace(tok=tok, c=client, url=url)
    client.close()
    http.stop()
    engine.shutdown(drain=False)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def error(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == status and err["type"], err
    return err["message"]


def test_tokenize_prompt_shapes_and_special_tokens(srv):
    text = "The pass key is 12345. Remember it."
    out = ok(srv.c.post("/tokenize", json={"model": MODEL, "prompt": text}))
    assert out == {"count": len(out["tokens"]), "max_model_len": 512, "tokens": srv.tok.encode(text),
                   "token_strs": None}
    assert out["tokens"][0] == srv.tok.bos_token_id
    plain = ok(srv.c.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                             "return_token_strs": True}))
    assert plain["tokens"] == out["tokens"][1:] and plain["count"] == out["count"] - 1
    assert "".join(plain["token_strs"]).replace("\u0120", " ") == text  # byte-level BPE pieces
    # the count is what a completion's usage reports for the same prompt
    usage = ok(srv.c.post("/v1/completions", json={"prompt": text, "max_tokens": 1}))["usage"]
    assert usage["prompt_tokens"] == out["count"]


def test_tokenize_messages_like_vllm(srv):
    out = ok(srv.c.post("/tokenize", json={"model": MODEL, "messages": MSGS}))
    assert out["tokens"] == srv.tok.apply_chat_template(MSGS, add_generation_prompt=True)
    assert out["tokens"][0] == srv.tok.bos_token_id and out["tokens"][1] != srv.tok.bos_token_id
    doubled = ok(srv.c.post("/tokenize", json={"messages": MSGS, "add_special_tokens": True}))
    assert doubled["tokens"] == [srv.tok.bos_token_id, *out["tokens"]]
    usage = ok(srv.c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1}))["usage"]
    assert usage["prompt_tokens"] == out["count"]


def test_detokenize_round_trip_keeps_special_tokens(srv):
    text = "Hello the model, 42 times."
    ids = ok(srv.c.post("/tokenize", json={"prompt": text}))["tokens"]
    assert ok(srv.c.post("/detokenize", json={"model": MODEL, "tokens": ids})) == {"prompt": "<s>" + text}
    assert ok(srv.c.post("/detokenize", json={"tokens": ids[1:]}))["prompt"] == text
    assert ok(srv.c.post("/detokenize", json={"tokens": []}))["prompt"] == ""


@pytest.mark.parametrize("path, body, status, param, fragment", [
    ("/tokenize", {}, 400, "prompt", "either"),
    ("/tokenize", {"prompt": "a", "messages": MSGS}, 400, "messages", "not both"),
    ("/tokenize", {"prompt": 7}, 400, "prompt", ""),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens", ""),
    ("/tokenize", {"messages": []}, 400, "messages", "at least one"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "robot"),
    ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model", "does not exist"),
    ("/detokenize", {"tokens": [1, 512]}, 400, "tokens", "tokens[1]: token id 512 is out of vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "out of vocabulary"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens", ""),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens[0]", ""),
    ("/detokenize", {}, 400, "tokens", ""),
])
def test_bad_bodies_name_the_field(srv, path, body, status, param, fragment):
    assert fragment in error(srv.c.post(path, json=body), status, param)


def test_invalid_json_and_oversized_ints(srv):
    error(srv.c.post("/tokenize", content=b"{not json"), 400, None)
    error(srv.c.post("/detokenize", content=b'{"tokens": [' + b"9" * 5000 + b"]}"), 400, "tokens")


def test_behind_the_api_key(srv):
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]})):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(srv.url + path, json=body, headers=headers, timeout=30)
            assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
            assert KEY not in r.text


def test_models_reports_max_model_len(srv):
    card = ok(srv.c.get("/v1/models"))["data"][0]
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL, "model", 512)
