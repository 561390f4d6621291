"""`expertmesh eval passkey` against real in-process HTTP servers: fakes that do or do not find the key, and the
served tiny model."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bench.passkey import MAX_NEW_TOKENS, Progress, fit_prompt, is_correct, passkey_text, redact_argv
from cluster.cli import main
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.tokenizer import Tokenizer, build_byte_level_bpe, write_tokenizer_files
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.scheduler import EngineConfig
from router.server import HttpThread

KEY = "pk-secret-123"
KEY_RE = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.")


def fake_app(tok: Tokenizer, finds: bool, seen: list[dict], fail_from: int | None = None) -> FastAPI:
    """/v1/models, /tokenize and both completion endpoints, behind KEY; answers with the key when `finds`, and
    HTTP 500 from the `fail_from`-th completion on."""
    app = FastAPI()

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {KEY}"

    def count(body: dict) -> int:
        if "messages" in body:
            return len(tok.apply_chat_template(body["messages"]))
        return len(tok.encode(body["prompt"], add_bos=body.get("add_special_tokens", True)))

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        return {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 32768}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        n = count(body)
        return {"count": n, "max_model_len": 32768, "tokens": list(range(n))}

    async def answer(request: Request, chat: bool):
        if not authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        body = await request.json()
        if fail_from is not None and len(seen) >= fail_from:
            return JSONResponse({"error": {"message": "expert 3 unreachable", "code": 500}}, 500)
        text = body["messages"][0]["content"] if chat else body["prompt"]
        m = KEY_RE.search(text)
        head, tail = text[:m.start()].split("there.", 1)[1], text[m.end():].rsplit("What is", 1)[0]
        before, after = len(head.split()), len(tail.split())
        seen.append({"body": body, "depth": before / (before + after), "tokens": count(body)})
        out = f" {m.group(1)}. The grass is green." if finds else " I do not know. 42"
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": out, "finish_reason": "length"})
        usage = {"prompt_tokens": count(body), "completion_tokens": 8, "total_tokens": count(body) + 8}
        return {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": "fake",
                "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, chat=True)

    return app


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pk_tok")
    write_tokenizer_files(d, build_byte_level_bpe(512), 1, 2, 32768)
    return d


def serve(app):
    http = HttpThread(app, "127.0.0.1", 0, graceful_s=0.1, log_level="critical")
    return http, f"http://127.0.0.1:{http.start(timeout_s=10)}"


@pytest.fixture(scope="module")
def finder(tok_dir):
    http, url = serve(fake_app(Tokenizer.from_dir(tok_dir), True, []))
    yield SimpleNamespace(url=url)
    http.stop()


@pytest.fixture(params=[True, False], ids=["finds", "misses"])
def fake(request, tok_dir):
    seen: list[dict] = []
    http, url = serve(fake_app(Tokenizer.from_dir(tok_dir), request.param, seen))
    yield SimpleNamespace(url=url, finds=request.param, seen=seen)
    http.stop()


def passkey(*flags):
    return main(["eval", "passkey", *flags])


def check_results(r: dict, lengths: list[int], depths: list[float], trials: int) -> None:
    assert [(x["length"], x["depth"], x["trial"]) for x in r["results"]] == [
        (n, d, t) for n in lengths for d in depths for t in range(trials)]
    for x in r["results"]:
        assert set(x) == {"length", "depth", "trial", "passkey", "answer", "correct", "prompt_tokens"}
        assert re.fullmatch(r"\d{5}", x["passkey"])
        assert abs(x["prompt_tokens"] - x["length"]) <= 0.02 * x["length"], x


def test_fake_server_finds_all_or_none(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_API_KEY", KEY)
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    lengths, depths = [1000, 4000, 32000], [0.0, 0.5, 1.0]
    assert passkey("--base-url", fake.url, "--lengths", ",".join(map(str, lengths)), "--depths", "0,0.5,1",
                   "--seed", "3", "--result-file", str(out), "--plot", str(png)) == 0
    r = json.loads(out.read_text())
    assert r["accuracy"] == (1.0 if fake.finds else 0.0)
    assert all(x["correct"] is fake.finds for x in r["results"])
    check_results(r, lengths, depths, 1)
    assert r["model"] == "fake" and r["endpoint"] == "/v1/completions" and r["command"].startswith(
        "expertmesh eval passkey --base-url")
    assert KEY not in out.read_text()
    # what the server received: greedy, the key at the asked depth, exactly the tokens the result reports
    assert len(fake.seen) == len(r["results"])
    for s, x in zip(fake.seen, r["results"], strict=True):
        assert s["body"]["temperature"] == 0 and s["body"]["max_tokens"] == MAX_NEW_TOKENS
        assert s["depth"] == pytest.approx(x["depth"], abs=0.01)
        assert s["tokens"] == x["prompt_tokens"]
    assert len({x["passkey"] for x in r["results"]}) == len(r["results"])  # a fresh key per prompt
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_local_tokenizer_chat_trials_and_key_flag(fake, tok_dir, tmp_path):
    out = tmp_path / "r.json"
    assert passkey("--base-url", fake.url, "--model", "fake", "--api-key", KEY, "--tokenizer", str(tok_dir),
                   "--chat", "--lengths", "600,2000", "--depths", "0.25,0.75", "--trials", "2",
                   "--result-file", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["accuracy"] == (1.0 if fake.finds else 0.0) and r["endpoint"] == "/v1/chat/completions"
    check_results(r, [600, 2000], [0.25, 0.75], 2)
    assert "--api-key ***" in r["command"] and KEY not in out.read_text()
    assert all("messages" in s["body"] for s in fake.seen)
    assert [g["trials"] for g in r["by_length_depth"]] == [2] * 4


@pytest.mark.parametrize("flags, flag, fragment", [
    (["--lengths", "1000,abc"], "--lengths", "comma-separated integers"),
    (["--lengths", "0"], "--lengths", "positive"),
    (["--depths", "0,1.5"], "--depths", "[0, 1]"),
    (["--depths", "nan"], "--depths", "numbers"),
    (["--trials", "0"], "--trials", "at least 1"),
    (["--lengths", "40000"], "--lengths", "max_model_len (32768)"),
    (["--lengths", "20"], "--lengths", "too short"),
    (["--model", "other"], "--model", "not served"),
    (["--tokenizer", "/nonexistent"], "--tokenizer", "tokenizer.json"),
    (["--plot", "/nonexistent/p.png"], "--plot", "does not exist"),
])
def test_bad_flags_exit_2_naming_the_flag(finder, tmp_path, monkeypatch, capsys, flags, flag, fragment):
    monkeypatch.setenv("EXPERTMESH_API_KEY", KEY)
    assert passkey("--base-url", finder.url, "--result-file", str(tmp_path / "r.json"), *flags) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err and fragment in err, err


def test_missing_key_is_a_clear_401(finder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    assert passkey("--base-url", finder.url, "--result-file", str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "EXPERTMESH_API_KEY" in err


def test_a_failed_request_keeps_the_answers_so_far(tok_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTMESH_API_KEY", KEY)
    http, url = serve(fake_app(Tokenizer.from_dir(tok_dir), True, [], fail_from=3))
    try:
        out = tmp_path / "r.json"
        assert passkey("--base-url", url, "--lengths", "500,900", "--result-file", str(out)) == 1
    finally:
        http.stop()
    r = json.loads(out.read_text())
    assert len(r["results"]) == 3 and r["accuracy"] == 1.0 and "HTTP 500" in r["error"]
    assert "stopped after 3 answers" in capsys.readouterr().err


def test_prompt_fitting_and_scoring():
    words = lambda text: len(text.split())  # noqa: E731  (a counter with a known, exact answer)
    for length in (80, 81, 333, 5000):
        for depth in (0.0, 0.3, 1.0):
            text, n = fit_prompt(length, depth, 12345, words)
            assert n == words(text) == length, (length, depth, n)
    text = passkey_text(10, 0.0, 777)
    assert text.startswith("There is an important info") and text.endswith("What is the pass key? The pass key is")
    assert text.index("The pass key is 777. Remember it. 777 is the pass key.") < text.index("The grass is green.")
    end = passkey_text(19, 1.0, 7)  # one whole filler cycle, the key after it
    assert end.rindex("There and back again.") < end.index("pass key is 7") and passkey_text(3, 0.0, 7).endswith(
        "777 is the pass key. The grass is What is the pass key? The pass key is".replace("777", "7"))
    assert is_correct(31415, " 31415.") and is_correct(31415, " 31,415") and is_correct(31415, "3 1 4 1 5")
    assert not is_correct(31415, " 3141") and not is_correct(31415, "")
    assert redact_argv(["--api-key", "s", "--x", "--api-key=t"]) == ["--api-key", "***", "--x", "--api-key=***"]


def test_progress_bar_on_a_terminal_lines_in_a_log(capsys):
    import sys

    p = Progress(4, bar=True, stream=sys.stderr, width=8)
    p.update(1, 1, "length 1000 depth 0")
    p.update(4, 2)
    err = capsys.readouterr().err
    assert "\r[passkey] [##......] 1/4 correct 100%" in err and "[########] 4/4 correct 50%" in err
    assert err.endswith("\n")
    log = Progress(4, bar=False, stream=sys.stderr)
    log.update(1, 1, "length 1000 depth 0")
    log.update(2, 1, "length 1000 depth 1", milestone=True)
    assert capsys.readouterr().err.startswith("[passkey] 2/4 done, correct 50%, 0s (length 1000 depth 1)\n")


def test_served_tiny_model_end_to_end(tmp_path):
    """The real server: /v1/models, /tokenize and greedy completions of the tiny random model (it cannot find
    the key; the run, the lengths and the result are what is checked)."""
    d = write_checkpoint(tmp_path / "tiny", "tiny", 0, "float32")
    engine = AsyncEngine(Engine(Mixtral.from_pretrained(d), EngineConfig(num_kv_blocks=64)))
    http, url = serve(build_app(engine, Tokenizer.from_dir(d), "tiny"))
    try:
        out = tmp_path / "r.json"
        assert passkey("--base-url", url, "--lengths", "200,480", "--depths", "0,1", "--result-file", str(out)) == 0
        r = json.loads(out.read_text())
        check_results(r, [200, 480], [0.0, 1.0], 1)
        assert r["max_model_len"] == 512 and 0.0 <= r["accuracy"] <= 1.0
        assert passkey("--base-url", url, "--lengths", "500", "--result-file", str(out)) == 2  # 500 + 16 > 512
    finally:
        http.stop()
        engine.shutdown(drain=False)
