"""The load tester on any model: random prompts from the served vocabulary (a tiny one under 500 ids), and a
stream counted as completed by its finish_reason, TTFT at its first generation chunk."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from bench.datasets import Vocab, random_requests, server_vocab, tokenizer_vocab
from bench.loadtest import LoadTestConfig, build_requests, prompt_vocab, run_load_test
from cluster.cli import main
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.tokenizer import Tokenizer
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.scheduler import EngineConfig
from router.server import HttpThread

V = 300  # below the old fixed id range's 500


def serve(app) -> tuple[HttpThread, str]:
    http = HttpThread(app, "127.0.0.1", 0, graceful_s=0.1, log_level="critical")
    return http, f"http://127.0.0.1:{http.start(timeout_s=10)}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = write_checkpoint(tmp_path_factory.mktemp("v300"), "tiny", 0, "float32", overrides={"vocab_size": V})
    engine = AsyncEngine(Engine(Mixtral.from_pretrained(d), EngineConfig(num_kv_blocks=128, max_num_seqs=16)))
    http, url = serve(build_app(engine, Tokenizer.from_dir(d), "v300", api_key="k"))
    yield d, url
    http.stop()
    engine.shutdown(drain=False)


def test_vocabulary_from_the_server_or_a_tokenizer(small):
    d, url = small
    assert server_vocab(url, "v300", {"Authorization": "Bearer k"}) == Vocab(V, frozenset({1}), f"{url}/detokenize")
    assert tokenizer_vocab(str(d)) == Vocab(V, frozenset({0, 1, 2}), f"--tokenizer {d}")
    with pytest.raises(ValueError, match="--api-key"):
        server_vocab(url, "v300", {})
    cfg = LoadTestConfig(url, 200, input_len=64, range_ratio=0.5, api_key="k")
    ids = [t for r in build_requests(cfg, prompt_vocab(cfg, "v300")) for t in r.prompt]
    assert min(ids) == 0 and max(ids) == V - 1 and 1 not in ids  # the whole vocabulary but BOS
    assert prompt_vocab(LoadTestConfig(url, 1, endpoint="/v1/chat/completions"), "v300") is None


@pytest.mark.parametrize("tokenizer", [False, True], ids=["server", "tokenizer"])
def test_no_failures_against_a_vocabulary_under_500(small, tmp_path, tokenizer):
    d, url = small
    out = tmp_path / "r.json"
    flags = ["--tokenizer", str(d)] if tokenizer else []
    assert main(["loadtest", "--no-progress", "--base-url", url, "--api-key", "k", "--num-prompts", "40",
                 "--max-concurrency", "8", "--input-len", "48", "--output-len", "4", "--range-ratio", "0.5",
                 "--seed", "5", "--result-file", str(out), *flags]) == 0
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"], r["failure_reasons"]) == (40, 0, {})
    assert all(2 <= n <= 6 for n in r["output_lens"]) and r["total_output_tokens"] == sum(r["output_lens"])
    assert all(24 <= n <= 72 for n in r["input_lens"]) and r["total_input_tokens"] == sum(r["input_lens"])


def test_bad_tokenizer_flag(capsys):
    assert main(["loadtest", "--base-url", "http://127.0.0.1:9", "--tokenizer", "/nonexistent"]) == 2
    assert "--tokenizer: no tokenizer.json" in capsys.readouterr().err


def sse_app(plan: list[tuple[float, dict]]) -> FastAPI:
    """Streams each planned chunk after its delay, then usage and [DONE], whatever the request."""
    app = FastAPI()

    @app.post("/v1/{endpoint:path}")
    async def stream(request: Request, endpoint: str):
        async def body():
            for delay, chunk in plan:
                await asyncio.sleep(delay)
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


def completion(text: str, finish: str | None = None) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def chat(delta: dict, finish: str | None = None) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.mark.parametrize("endpoint, plan, ok, ttft_min", [
    # two tokens whose text is held back or empty: completed (a finish_reason), as vLLM's client counts it
    ("/v1/completions", [(0.2, completion("")), (0.05, completion("", "length"))], True, 0.2),
    # text but no finish_reason before [DONE]: not completed
    ("/v1/completions", [(0.0, completion("a")), (0.0, completion("b"))], False, 0.0),
    # a chat stream's role announcement comes at once; the first token 0.3 s later is the TTFT
    ("/v1/chat/completions", [(0.0, chat({"role": "assistant", "content": ""})), (0.3, chat({"content": "x"})),
                              (0.0, chat({}, "stop"))], True, 0.3),
])
def test_completed_by_finish_reason_ttft_at_first_chunk(endpoint, plan, ok, ttft_min):
    prompts = random_requests(2, 4, 2, vocab=Vocab(50))  # the fake server has no /tokenize
    http, url = serve(sse_app(plan))
    try:
        lt = run_load_test(LoadTestConfig(url, 2, endpoint=endpoint, model="m", input_len=4, output_len=2,
                                          progress=False, scrape_metrics=False),
                           requests=None if endpoint.endswith("chat/completions") else prompts)
    finally:
        http.stop()
    r = lt.result
    assert (r["completed"], r["failed"]) == ((2, 0) if ok else (0, 2)), r["failure_reasons"]
    if ok:
        assert all(ttft_min <= t < ttft_min + 5 for t in r["ttfts"]) and r["output_lens"] == [2, 2]
    else:
        assert r["failure_reasons"] == {"no finish_reason": 2}
