"""The OpenAI server end to end: a real uvicorn server, the official openai client, a tiny HF Mixtral."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from model.generation import generate
from model.mixtral import Mixtral
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.requests import RequestOutput, TokenOutput
from router.scheduler import EngineConfig
from router.server import HttpThread

V, MAX_LEN, MODEL, NUM_BLOCKS = 512, 512, "tiny-mixtral", 512
PROMPT = "Hello the model"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


class Server(HttpThread):
    """uvicorn on 127.0.0.1, a free port, in a background thread."""

    def __init__(self, app):
        super().__init__(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.start(timeout_s=10)}"


@pytest.fixture(scope="module")
def srv(model, tok):
    engine = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=NUM_BLOCKS, max_num_seqs=64)))
    server = Server(build_app(engine, tok, MODEL))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(engine=engine, url=server.url, client=client, http=httpx.Client(timeout=60))
    server.stop()
    engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def limited(model, tok):
    """One running and one waiting request at most, an api key, a switchable health check, /metrics."""
    from prometheus_client import CollectorRegistry, make_asgi_app

    healthy = [True]
    engine = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64, max_num_seqs=1, max_waiting=1)))
    app = build_app(engine, tok, MODEL, api_key="secret", health_check=lambda: healthy[0],
                    metrics_app=make_asgi_app(CollectorRegistry()))
    server = Server(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0, timeout=60)
    yield SimpleNamespace(engine=engine, url=server.url, client=client, healthy=healthy)
    server.stop()
    engine.shutdown(drain=False)


def reference(model, tok, prompt_ids, n):
    """Greedy ids/text from the static-batch reference path."""
    ids = generate(model, [list(prompt_ids)], SamplingParams(max_tokens=n, ignore_eos=True))[0][0]
    return ids, tok.decode(ids)


def sse_events(lines):
    """`data: ...` payloads of an SSE body, checking the blank-line framing."""
    events = []
    for block in lines.split("\n\n"):
        if block:
            assert block.startswith("data: ") and "\n" not in block, block
            events.append(block[len("data: "):])
    assert lines.endswith("data: [DONE]\n\n") and events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def wait_idle(engine, timeout=5.0):
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished() or engine.engine.stats().num_free_blocks != engine.engine.stats(
            ).num_kv_blocks:
        assert time.monotonic() < deadline, engine.engine.stats()
        time.sleep(0.01)


# --- happy paths -----------------------------------------------------------------------------------------

def test_completion_text_and_token_prompts(srv, model, tok):
    ids = tok.encode(PROMPT)
    ref_ids, ref_text = reference(model, tok, ids, 12)
    for prompt in (PROMPT, ids, [PROMPT], [ids]):
        r = srv.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
        assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
        c = r.choices[0]
        assert (c.index, c.text, c.finish_reason, c.logprobs) == (0, ref_text, "length", None)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12,
                                                                                              len(ids) + 12)


def test_seed_and_top_k_through_the_api(srv, model, tok):
    """`seed`: the same seed gives the same text, other seeds other texts; `top_k=1` at temperature 1 is greedy."""
    def text(**kw):
        body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "temperature": 1.0, **kw}
        r = srv.http.post(srv.url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    seeded = text(seed=1234)
    assert text(seed=1234) == seeded
    others = [text(seed=s) for s in (1, 2, 3)]
    assert any(o != seeded for o in others), (seeded, others)
    _, greedy = reference(model, tok, tok.encode(PROMPT), 12)
    assert seeded != greedy  # temperature 1 over a random model's flat logits: sampling, not argmax
    assert text(top_k=1, seed=5) == text(top_k=1) == text(temperature=0) == greedy


def test_eos_stop_through_the_api(eos_model_dir):
    """The EOS checkpoint (greedy after CHAIN[0]: CHAIN[1:], then EOS) served: finish_reason "stop" at exactly
    the EOS token, streaming or not; the EOS token counts as a completion token but adds no text."""
    from tests.router.conftest import CHAIN, EOS_AFTER

    eos_model, eos_tok = Mixtral.from_pretrained(eos_model_dir), Tokenizer.from_dir(eos_model_dir)
    engine = AsyncEngine(Engine(eos_model, EngineConfig(num_kv_blocks=64)))
    server = Server(build_app(engine, eos_tok, MODEL))
    try:
        prompt = [eos_model.cfg.bos_token_id, 5, CHAIN[0]]
        body = {"prompt": prompt, "max_tokens": 20, "temperature": 0, "logprobs": 0}
        r = httpx.post(server.url + CMPL, json=body, timeout=60).json()
        c = r["choices"][0]
        assert (c["finish_reason"], r["usage"]["completion_tokens"]) == ("stop", EOS_AFTER + 1)
        assert c["text"] == eos_tok.decode(list(CHAIN[1:]))
        events = sse_events(httpx.post(server.url + CMPL, json={**body, "stream": True}, timeout=60).text)
        assert [e["choices"][0]["finish_reason"] for e in events] == [None] * EOS_AFTER + ["stop"]
        assert "".join(e["choices"][0]["text"] for e in events) == c["text"]
        r = httpx.post(server.url + CMPL, json={**body, "ignore_eos": True}, timeout=60).json()
        assert (r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) == ("length", 20)
    finally:
        server.stop()
        engine.shutdown(drain=False)


def test_default_max_tokens_is_the_rest_of_the_context(srv, tok):
    ids = tok.encode(PROMPT) + [5] * (MAX_LEN - 8 - len(tok.encode(PROMPT)))
    r = srv.client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"


def test_chat(srv, model, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    prompt_ids = tok.apply_chat_template(msgs)
    _, ref_text = reference(model, tok, prompt_ids, 10)
    r = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", ref_text, "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), 10)
    r2 = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10, **GREEDY)
    assert r2.choices[0].message.content == ref_text


def test_streaming_completion(srv):
    full = srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, **GREEDY).choices[0].text
    chunks = list(srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    raw = srv.http.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.text)
    assert all("usage" not in e for e in events) and events[-1]["choices"][0]["finish_reason"] is not None


def test_streaming_chat(srv):
    msgs = [{"role": "user", "content": "Hello"}]
    full = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=15, **GREEDY)
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=15, stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completion_logprobs(srv):
    r = srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for i, (t, l, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert l <= 0 and 3 <= len(top) <= 4 and top[t] == pytest.approx(l)
        assert l == pytest.approx(max(top.values()))  # greedy picks the most likely token
        if i:
            assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    chunks = list(srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3,
                                                stream=True, **GREEDY))
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == lp.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset


def test_chat_logprobs(srv):
    msgs = [{"role": "user", "content": "Hello"}]
    r = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, logprobs=True,
                                           top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert e.logprob <= 0 and e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob) and e.top_logprobs[0].token == e.token
    r = srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_stop_strings(srv):
    full = srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, **GREEDY).choices[0].text
    pos = next(i for i in range(5, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].isalnum())
    stop = full[pos:pos + 3]
    expected = full[:full.find(stop)]
    r = srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, stop=[stop, "never-seen"],
                                      **GREEDY)
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.model_extra.get("stop_reason")) == (expected, "stop", stop)
    assert r.usage.completion_tokens < 40
    chunks = list(srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, stop=stop,
                                                stream=True, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(srv.engine)  # the stopped request was aborted in the engine


def test_models_health_version_request_id(srv):
    models = srv.client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "expertmesh")]
    assert models[0].model_extra["max_model_len"] == MAX_LEN and models[0].model_extra["root"] == MODEL
    h = srv.http.get(srv.url + "/health")
    assert (h.status_code, h.content) == (200, b"")
    assert srv.http.get(srv.url + "/version").json()["version"]
    r = srv.http.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                      headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"].startswith("cmpl-trace-42")
    r = srv.http.get(srv.url + "/v1/models")
    assert len(r.headers["x-request-id"]) == 32
    assert srv.http.get(srv.url + "/v1/nope").json()["error"]["type"] == "NotFoundError"


# --- bad input ---------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, status, param or None, message fragment)
    (CMPL, b"{not json", 400, None, "Invalid JSON"),
    (CMPL, b"[1, 2]", 400, None, "JSON object"),
    (CMPL, b'{"prompt": "x", "temperature": NaN}', 400, None, "NaN is not valid JSON"),
    (CMPL, b"[" * 100000 + b"]" * 100000, 400, None, "Invalid JSON"),
    (CMPL, b"\xff\xfe", 400, None, "Invalid JSON"),
    (CMPL, {}, 400, "prompt", "required"),
    (CMPL, {"prompt": PROMPT, "seed": 2**70}, 400, "seed", "seed"),
    (CMPL, {"prompt": PROMPT, "max_tokens": 10**30}, 400, "max_tokens", "maximum context length"),
    (CMPL, {"prompt": [True]}, 400, "prompt", "prompt"),
    (CMPL, {"prompt": 5}, 400, "prompt", "prompt"),
    (CMPL, {"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    (CMPL, {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    (CMPL, {"prompt": PROMPT, "max_tokens": -3}, 400, "max_tokens", "at least 1"),
    (CMPL, {"prompt": PROMPT, "max_tokens": 600}, 400, "max_tokens",
     "This model's maximum context length is 512 tokens. However, you requested"),
    (CMPL, {"prompt": [7] * 600, "max_tokens": 1}, 400, "prompt", "maximum context length is 512"),
    (CMPL, {"prompt": [7] * 512}, 400, "prompt", "maximum context length is 512"),
    (CMPL, {"prompt": ""}, 400, "prompt", "empty"),
    (CMPL, {"prompt": []}, 400, "prompt", "empty"),
    (CMPL, {"prompt": [[]]}, 400, "prompt", "empty"),
    (CMPL, {"prompt": ["a", "b"]}, 400, "prompt", "batched"),
    (CMPL, {"prompt": [1, 99999]}, 400, "prompt", "out of vocabulary"),
    (CMPL, {"prompt": PROMPT, "n": 2}, 400, "n", "n=1"),
    (CMPL, {"prompt": PROMPT, "temperature": -0.5}, 400, "temperature", "temperature"),
    (CMPL, {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", "temperature"),
    (CMPL, {"prompt": PROMPT, "top_p": 0}, 400, "top_p", "top_p"),
    (CMPL, {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", "top_p"),
    (CMPL, {"prompt": PROMPT, "top_k": -2}, 400, "top_k", "top_k"),
    (CMPL, {"prompt": PROMPT, "echo": True}, 400, "echo", "echo"),
    (CMPL, {"prompt": PROMPT, "logprobs": 50}, 400, "logprobs", "logprobs"),
    (CMPL, {"prompt": PROMPT, "stop": 3}, 400, "stop", "stop"),
    (CMPL, {"prompt": PROMPT, "stop": [""]}, 400, "stop", "stop"),
    (CMPL, {"prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty", "0"),
    (CMPL, {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    (CMPL, {"prompt": PROMPT, "model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "role"),
    (CHAT, {"messages": USER * 2}, 400, "messages", "alternate"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages", "content"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", "text"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role", "required"),
    (CHAT, {"messages": []}, 400, "messages", "at least one"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages",
     "text"),
    (CHAT, {"messages": "hi"}, 400, "messages", "list"),
    (CHAT, {"messages": USER, "n": 3}, 400, "n", "n=1"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least 1"),
    (CHAT, {"messages": USER, "max_tokens": 1000}, 400, "max_tokens", "maximum context length"),
    (CHAT, {"messages": USER, "model": "other"}, 404, "model", "does not exist"),
]


def test_bad_inputs_beside_a_long_stream(srv):
    result, started = {"chunks": []}, threading.Event()

    def long_stream():
        for c in srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True,
                                               stream_options={"include_usage": True}, **GREEDY):
            result["chunks"].append(c)
            started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(10)
    overlapping = 0
    for path, body, status, param, fragment in BAD:
        overlapping += t.is_alive()
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = srv.http.post(srv.url + path, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["code"] == status and err["param"] == param, (body, err)
        assert err["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
        assert fragment in err["message"], (body, err)
    assert overlapping >= 10, "the bad requests should run beside the long stream"
    t.join(30)
    chunks = result["chunks"]
    assert chunks[-1].usage.completion_tokens == 200 and chunks[-2].choices[0].finish_reason == "length"
    full = srv.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, **GREEDY).choices[0].text
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full
    wait_idle(srv.engine)


# --- disconnects and concurrency ---------------------------------------------------------------------------

def test_client_disconnect_frees_kv_blocks(srv, tok):
    eng = srv.engine.engine
    wait_idle(srv.engine)
    before = eng.stats().generation_tokens_total
    body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with srv.http.stream("POST", srv.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert eng.stats().num_free_blocks < NUM_BLOCKS
    wait_idle(srv.engine)
    assert eng.stats().generation_tokens_total - before < 300
    # Non-streaming: the client hangs up once its request is generating (not after a guessed delay); the
    # request is aborted, so far fewer tokens than it asked for are generated, however fast the machine.
    before = eng.stats().generation_tokens_total
    wanted = MAX_LEN - len(tok.encode(PROMPT))
    payload = json.dumps({**body, "stream": False, "max_tokens": wanted}).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 30
        while eng.stats().generation_tokens_total == before:
            assert time.monotonic() < deadline, "the request never started generating"
            time.sleep(0.001)
    wait_idle(srv.engine)
    assert eng.stats().generation_tokens_total - before < wanted // 2


def test_concurrent_greedy_matches_sequential(srv):
    prompts = [f"{PROMPT} {'the ' * (i % 7)}number {i}" for i in range(32)]

    def key(r):
        return r.choices[0].text, r.choices[0].logprobs.tokens, r.usage.completion_tokens

    args = {"model": MODEL, "max_tokens": 16, "logprobs": 0, **GREEDY}
    sequential = [key(srv.client.completions.create(prompt=p, **args)) for p in prompts]

    async def concurrent():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(c.completions.create(prompt=p, **args) for p in prompts))

    assert [key(r) for r in asyncio.run(concurrent())] == sequential
    wait_idle(srv.engine)


# --- api key, health check, queue full, dead engine --------------------------------------------------------

def test_api_key_health_metrics(limited):
    r = httpx.get(limited.url + "/v1/models")
    assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    r = httpx.get(limited.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "x-request-id" in r.headers
    assert limited.client.models.list().data[0].id == MODEL
    assert httpx.get(limited.url + "/health").status_code == 200
    m = httpx.get(limited.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    r = httpx.get(limited.url + "/v1/admin/engine")
    assert r.status_code == 401
    r = httpx.get(limited.url + "/v1/admin/engine", headers={"Authorization": "Bearer secret"}).json()
    assert r["model"] == MODEL and r["accepting"] and r["num_kv_blocks"] == 64 and r["max_request_tokens"] == MAX_LEN
    assert r["failed_steps_total"] == 0 and r["recovering"] is False and r["max_model_len"] == MAX_LEN
    limited.healthy[0] = False
    assert httpx.get(limited.url + "/health").status_code == 503
    limited.healthy[0] = True
    assert httpx.get(limited.url + "/health").status_code == 200


def test_queue_full_is_429(limited):
    c = limited.client
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "stream": True, **GREEDY}
    running = c.completions.create(**long)
    next(iter(running))  # its first token arrived: it is running (max_num_seqs=1)
    waiting = c.completions.create(**long)  # admitted; waits for the running one
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    assert e.value.body["type"] == "RateLimitError" and "queue is full" in e.value.body["message"]
    running.close()
    waiting.close()
    wait_idle(limited.engine)


def test_dead_engine_is_503(limited):
    limited.engine.shutdown(drain=False)
    assert httpx.get(limited.url + "/health").status_code == 503
    r = httpx.post(limited.url + "/v1/completions", json={"prompt": PROMPT},
                   headers={"Authorization": "Bearer secret"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"


# --- errors after the stream started -----------------------------------------------------------------------

class FailingEngine:
    """One token, then the engine fails the request (error output) or raises."""

    is_alive = True
    max_model_len = max_request_tokens = 512  # MAX_LEN

    def __init__(self, mode):
        self.mode, self.aborted = mode, []

    async def generate(self, request):
        async def stream():
            yield RequestOutput(request.request_id, (TokenOutput(300),), len(request.prompt_ids), 1)
            if self.mode == "raise":
                raise RuntimeError("expert 3 unreachable")
            yield RequestOutput(request.request_id, (), len(request.prompt_ids), 1, finished=True,
                                finish_reason="abort", error="expert 3 unreachable")
        return stream()

    def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.mark.parametrize("mode", ["raise", "error_output"])
def test_error_after_stream_start_goes_in_band(tok, mode):
    engine = FailingEngine(mode)
    server = Server(build_app(engine, tok, MODEL))
    try:
        r = httpx.post(server.url + CHAT, json={"messages": USER, "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        err = events[-1]["error"]
        assert "expert 3 unreachable" in err["message"] and err["code"] == 500
        r = httpx.post(server.url + CMPL, json={"prompt": PROMPT})
        assert r.status_code == 500 and "expert 3 unreachable" in r.json()["error"]["message"]
    finally:
        server.stop()
