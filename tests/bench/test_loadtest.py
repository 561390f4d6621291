"""`expertmesh loadtest` against a live uvicorn server over the real engine, plus its pure parts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app

from bench import expert_view as ev
from bench.datasets import SampleRequest, Vocab, random_requests
from bench.loadtest import LoadTestConfig, RequestResult, arrival_times, compute_metrics, run_load_test
from cluster.cli import main
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.tokenizer import Tokenizer
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.requests import EngineDeadError, RequestOutput, TokenOutput
from router.scheduler import EngineConfig
from router.server import HttpThread

MODEL, MAX_LEN = "tiny-mixtral", 512
VOCAB = Vocab(512, frozenset({0, 1, 2}))  # the tiny preset's
STATS = ("mean", "median", "std", "p90", "p99")
VLLM_KEYS = {  # `vllm bench serve --save-result --metric-percentiles 90,99`
    "date", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency", "duration",
    "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
    "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "errors",
    *(f"{s}_{m}_ms" for s in STATS for m in ("ttft", "tpot", "itl", "e2el"))}


class InFlight:
    """ASGI middleware: counts /v1 generation requests in flight (max seen) and feeds synthetic expert metrics."""

    def __init__(self, app, metrics=None):
        self.app, self.metrics = app, metrics
        self.now = self.max = self.total = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        self.now += 1
        self.total += 1
        self.max = max(self.max, self.now)
        if self.metrics:
            experts, workers, dispatch = self.metrics
            experts.labels(layer="0", expert="0").inc(3)
            experts.labels(layer="0", expert="1").inc(1)
            workers.labels(worker="w0").inc(2)
            workers.labels(worker="w1").inc(1)
            dispatch.labels(worker="w0").observe(0.0015)
        try:
            await self.app(scope, receive, send)
        finally:
            self.now -= 1


class Server(HttpThread):
    """uvicorn on a free 127.0.0.1 port in a thread; stop() cuts streams still running after 0.1 s."""

    def __init__(self, app):
        super().__init__(app, "127.0.0.1", 0, graceful_s=0.1, log_level="critical")
        self.url = f"http://127.0.0.1:{self.start(timeout_s=10)}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("lt_tiny"), "tiny", 0, "float32")


@pytest.fixture(scope="module")
def model(model_dir):
    return Mixtral.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


def serve(model, tok, metrics=False, api_key=None, **engine_kw):
    engine = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=512, **engine_kw)))
    reg = CollectorRegistry()
    fake = None
    if metrics:
        fake = (Counter("expertmesh_expert_tokens", "t", ["layer", "expert"], registry=reg),
                Counter("expertmesh_worker_dispatch_tokens", "t", ["worker"], registry=reg),
                Histogram("expertmesh_dispatch_duration_seconds", "s", ["worker"], registry=reg,
                          buckets=(0.001, 0.002, 0.005)))
        fake[0].labels(layer="0", expert="1").inc(100)  # before the run: not in its delta
    app = InFlight(build_app(engine, tok, MODEL, api_key=api_key,
                             metrics_app=make_asgi_app(reg) if metrics else None), fake)
    return SimpleNamespace(engine=engine, server=Server(app), inflight=app)


@pytest.fixture(scope="module")
def srv(model, tok):
    s = serve(model, tok, metrics=True, max_num_seqs=64)
    yield SimpleNamespace(url=s.server.url, engine=s.engine.engine, inflight=s.inflight)
    s.server.stop()
    s.engine.shutdown(drain=False)


def loadtest(*flags):
    return main(["loadtest", "--no-progress", *flags])


# --- pure parts ------------------------------------------------------------------------------------------------

def test_arrival_schedule_statistics():
    assert arrival_times(5, float("inf")) == [0.0] * 5
    assert arrival_times(50, 3.0, seed=7) == arrival_times(50, 3.0, seed=7) != arrival_times(50, 3.0, seed=8)
    for burstiness in (1.0, 0.5, 4.0):
        for seed in range(5):
            t = arrival_times(200, 20.0, burstiness, seed)
            gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
            assert t[0] == 0 and all(g > 0 for g in gaps)
            assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.15)  # achieved rate within 15%
            cv = statistics.pstdev(gaps) / statistics.mean(gaps)  # gamma: cv = 1/sqrt(shape)
            assert cv == pytest.approx(burstiness ** -0.5, rel=0.3)


def test_random_prompts_are_seeded_and_in_range():
    a = random_requests(300, 100, 20, 0.5, seed=1, vocab=VOCAB)
    assert a == random_requests(300, 100, 20, 0.5, 1, vocab=VOCAB) != random_requests(300, 100, 20, 0.5, 2, vocab=VOCAB)
    assert all(50 <= r.prompt_len == len(r.prompt) <= 150 and 10 <= r.output_len <= 30 for r in a)
    assert max(r.prompt_len for r in a) > 140 and min(r.prompt_len for r in a) < 60
    assert {len(r.prompt) for r in random_requests(10, 7, 3, 0.0, vocab=VOCAB)} == {7}
    chat = random_requests(3, 12, 4, 0.0, chat=True)
    assert all(r.prompt is None and len(r.messages[0]["content"].split()) == 12 for r in chat)


def test_metrics_tpot_goodput_failures():
    def ok(i, ttft, lat, n, itl):
        return RequestResult(i, 10, success=True, output_tokens=n, ttft=ttft, latency=lat, itl=itl)

    rs = [ok(0, 0.1, 1.0, 10, [0.1] * 9), ok(1, 0.3, 0.3, 1, []),
          RequestResult(2, 7, reason="HTTP 429", error="HTTP 429: busy"),
          RequestResult(3, 7, reason="HTTP 429", error="HTTP 429: busy"),
          RequestResult(4, 7, reason="timeout", error="ReadTimeout")]
    m = compute_metrics(rs, 2.0, {"ttft": 200, "e2el": 5000})
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 3, 20, 11)
    assert m["mean_tpot_ms"] == pytest.approx(100)  # (1.0 - 0.1) / 9; the 1-token request has no TPOT
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_e2el_ms"] == pytest.approx(650)
    assert m["request_goodput"] == pytest.approx(0.5) and m["request_throughput"] == pytest.approx(1.0)
    assert m["failure_reasons"] == {"HTTP 429": 2, "timeout": 1}
    assert m["errors"][:3] == ["", "", "HTTP 429: busy"] and m["output_lens"] == [10, 1, 0, 0, 0]
    assert compute_metrics([], 1.0)["mean_ttft_ms"] == 0.0 and compute_metrics([], 1.0)["request_goodput"] is None


BEFORE = """# TYPE ray_expertmesh_expert_tokens_total counter
ray_expertmesh_expert_tokens_total{layer="0",expert="0",node="a"} 10
ray_expertmesh_expert_tokens_total{layer="0",expert="0",node="b"} 5
ray_expertmesh_expert_tokens_total{layer="0",expert="1",node="a"} 50
ray_expertmesh_expert_tokens_total{layer="1",expert="0",node="a"} 7
# TYPE expertmesh_dispatch_duration_seconds histogram
expertmesh_dispatch_duration_seconds_bucket{worker="w0",le="0.001"} 1
expertmesh_dispatch_duration_seconds_bucket{worker="w0",le="0.01"} 1
expertmesh_dispatch_duration_seconds_bucket{worker="w0",le="+Inf"} 1
expertmesh_dispatch_duration_seconds_sum{worker="w0"} 0.0005
expertmesh_dispatch_duration_seconds_count{worker="w0"} 1
"""
AFTER = """# TYPE ray_expertmesh_expert_tokens_total counter
ray_expertmesh_expert_tokens_total{layer="0",expert="0",node="a"} 40
ray_expertmesh_expert_tokens_total{layer="0",expert="0",node="b"} 35
ray_expertmesh_expert_tokens_total{layer="0",expert="1",node="a"} 70
ray_expertmesh_expert_tokens_total{layer="0",expert="2",node="a"} 0
ray_expertmesh_expert_tokens_total{layer="1",expert="0",node="a"} 3
ray_expertmesh_expert_tokens_total{layer="1",expert="1",node="a"} 3
# TYPE expertmesh_worker_dispatch_tokens_total counter
expertmesh_worker_dispatch_tokens_total{worker="w0"} 300
expertmesh_worker_dispatch_tokens_total{worker="w1"} 100
# TYPE expertmesh_dispatch_duration_seconds histogram
expertmesh_dispatch_duration_seconds_bucket{worker="w0",le="0.001"} 1
expertmesh_dispatch_duration_seconds_bucket{worker="w0",le="0.01"} 101
expertmesh_dispatch_duration_seconds_bucket{worker="w0",le="+Inf"} 101
expertmesh_dispatch_duration_seconds_sum{worker="w0"} 0.4005
expertmesh_dispatch_duration_seconds_count{worker="w0"} 101
expertmesh_dispatch_duration_seconds_bucket{worker="w1",le="0.001"} 0
expertmesh_dispatch_duration_seconds_bucket{worker="w1",le="0.01"} 0
expertmesh_dispatch_duration_seconds_bucket{worker="w1",le="+Inf"} 2
expertmesh_dispatch_duration_seconds_sum{worker="w1"} 1.0
expertmesh_dispatch_duration_seconds_count{worker="w1"} 2
"""


def test_expert_view_from_metric_deltas():
    v = ev.expert_view(ev.parse_metrics(BEFORE), ev.parse_metrics(AFTER))
    l0, l1 = v["layers"]
    # layer 0 delta: expert 0 = 30 + 30 (two nodes summed), expert 1 = 20, expert 2 = 0
    assert (l0["layer"], l0["tokens"], l0["experts"], l0["hottest_expert"]) == ("0", 80, 3, "0")
    assert l0["max_mean"] == pytest.approx(60 / (80 / 3)) and l0["hottest_share"] == pytest.approx(0.75)
    # layer 1: expert 0 went 7 -> 3, a counter reset, so its delta is 3
    assert (l1["tokens"], l1["max_mean"], l1["hottest_expert"]) == (6, 1.0, "0")
    assert v["expert_max_mean"] == pytest.approx(2.25)
    assert v["workers"] == {"tokens": {"w0": 300, "w1": 100}, "max_mean": 1.5}
    w0, w1 = v["dispatch"]["w0"], v["dispatch"]["w1"]
    assert (w0["count"], w0["mean_ms"]) == (100, pytest.approx(4.0))
    assert w0["p99_ms"] == pytest.approx(1 + 9 * 0.99)  # all 100 in (1, 10] ms: interpolated
    assert w1["p99_ms"] == pytest.approx(10) and w1["mean_ms"] == pytest.approx(500)  # +Inf: highest bound
    assert "hottest expert 0 (75.0%)" in ev.format_view(v)
    missing = ev.expert_view(ev.parse_metrics("# TYPE x counter\nx_total 1\n"), ev.parse_metrics("x_total 2\n"))
    assert missing["available"] is False and "not available" in missing["reason"]
    assert "not available" in ev.expert_view(None, None, "HTTP 404")["reason"]


BAD_FLAGS = [
    (["--request-rate", "0"], "--request-rate"), (["--request-rate", "-3"], "--request-rate"),
    (["--request-rate", "fast"], "--request-rate"), (["--endpoint", "/v1/embeddings"], "--endpoint"),
    (["--dataset", "/nonexistent/prompts.jsonl"], "--dataset"), (["--range-ratio", "1"], "--range-ratio"),
    (["--range-ratio", "-0.1"], "--range-ratio"), (["--goodput", "ttft"], "--goodput"),
    (["--goodput", "ttft:soon"], "--goodput"), (["--goodput", "latency:5"], "--goodput"),
    (["--goodput", "tpot:-1"], "--goodput"), (["--max-concurrency", "0"], "--max-concurrency"),
    (["--num-prompts", "0"], "--num-prompts"), (["--burstiness", "0"], "--burstiness"),
    (["--input-len", "ten"], "--input-len"), (["--timeout", "0"], "--timeout"),
    (["--dataset", "x.jsonl", "--input-len", "5"], "--dataset"), (["--plot", "/nonexistent/p.png"], "--plot"),
]


@pytest.mark.parametrize("flags,flag", BAD_FLAGS)
def test_bad_flags_exit_2_naming_the_flag(flags, flag, capsys):
    assert loadtest("--base-url", "http://127.0.0.1:9", "--model", "m", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("expertmesh loadtest: error: ") and flag in err, err


def test_bad_dataset_lines(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    for text, fragment in [('{"prompt": "a"}\n{oops\n', ":2: invalid JSON"), ('{"text": "a"}\n', "either"),
                           ('{"prompt": "a", "output_len": 0}\n', "output_len"), ("\n", "no requests"),
                           ('{"messages": [{"role": "user", "content": "a"}]}\n', "chat/completions")]:
        path.write_text(text)
        assert loadtest("--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset", str(path)) == 2
        err = capsys.readouterr().err
        assert "--dataset" in err and fragment in err, err


# --- against the live server -----------------------------------------------------------------------------------

def test_live_run_tokens_concurrency_keys_expert_view_plot(srv, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    generated = srv.engine.stats().generation_tokens_total
    srv.inflight.max = 0
    assert loadtest("--base-url", srv.url, "--num-prompts", "24", "--max-concurrency", "3", "--input-len", "16",
                    "--output-len", "8", "--range-ratio", "0.5", "--seed", "3", "--result-file", str(out),
                    "--plot", str(png), "--goodput", "ttft:60000", "tpot:60000", "e2el:60000") == 0
    r = json.loads(out.read_text())
    assert set(r) == VLLM_KEYS | {"failure_reasons", "expert_view"}
    assert (r["completed"], r["failed"], r["num_prompts"], r["failure_reasons"]) == (24, 0, 24, {})
    wanted = random_requests(24, 16, 8, 0.5, seed=3, vocab=VOCAB)
    assert r["output_lens"] == [w.output_len for w in wanted]  # usage counts; ignore_eos makes them exact
    assert r["total_output_tokens"] == sum(w.output_len for w in wanted)
    assert srv.engine.stats().generation_tokens_total - generated == r["total_output_tokens"]
    assert r["input_lens"] == [w.prompt_len for w in wanted] and r["total_input_tokens"] == sum(r["input_lens"])
    assert srv.inflight.max == 3  # --max-concurrency, as the server saw it
    assert (r["backend"], r["model_id"], r["request_rate"], r["max_concurrency"]) == ("openai", MODEL, "inf", 3)
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert all(len(itl) <= n - 1 for itl, n in zip(r["itls"], r["output_lens"], strict=True))
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and r["mean_tpot_ms"] > 0 and r["errors"] == [""] * 24
    view = r["expert_view"]  # the test app's fake metrics: per request 3 + 1 expert tokens, 2 + 1 worker tokens
    assert view["layers"] == [{"layer": "0", "tokens": 96, "experts": 2, "max_mean": 1.5, "hottest_expert": "0",
                               "hottest_share": 0.75}]
    assert view["workers"]["max_mean"] == pytest.approx(4 / 3)
    assert view["dispatch"]["w0"]["count"] == 24 and view["dispatch"]["w0"]["mean_ms"] == pytest.approx(1.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = capsys.readouterr().out
    assert "Serving Benchmark Result" in report and "hottest expert 0 (75.0%)" in report


def test_live_send_rate_follows_request_rate(srv):
    rate, n, seed = 25.0, 50, 1
    lt = run_load_test(LoadTestConfig(srv.url, n, rate, input_len=4, output_len=2, seed=seed, progress=False))
    assert lt.result["completed"] == n
    starts = sorted(r.start for r in lt.requests)
    measured = (n - 1) / (starts[-1] - starts[0])
    assert measured == pytest.approx(rate, rel=0.25)
    scheduled = arrival_times(n, rate, 1.0, seed)
    assert measured == pytest.approx((n - 1) / scheduled[-1], rel=0.1)  # the driver keeps to its schedule


def test_live_chat_and_dataset(srv, tok, tmp_path):
    msgs = [{"role": "user", "content": "hello there"}]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": msgs, "output_len": 5}) + "\n\n"
                    + json.dumps({"prompt": "tell me a story", "output_len": 3}) + "\n"
                    + json.dumps({"prompt": "no length"}) + "\n")
    out = tmp_path / "r.json"
    assert loadtest("--base-url", srv.url, "--endpoint", "/v1/chat/completions", "--dataset", str(data),
                    "--num-prompts", "5", "--output-len", "4", "--result-file", str(out)) == 0
    r = json.loads(out.read_text())
    assert (r["completed"], r["backend"]) == (5, "openai-chat")
    assert r["output_lens"][:2] == r["output_lens"][3:] == [5, 3] and 1 <= r["output_lens"][2] <= 4
    assert r["input_lens"][0] == len(tok.apply_chat_template(msgs, add_generation_prompt=True))  # from usage
    lt = run_load_test(LoadTestConfig(srv.url, 4, endpoint="/v1/chat/completions", input_len=10, output_len=4,
                                      progress=False, scrape_metrics=False))
    assert lt.result["output_lens"] == [4] * 4 and lt.result["expert_view"]["available"] is False


def test_queue_full_429s_are_failures_with_reason(model, tok, model_dir):
    s = serve(model, tok, api_key="secret", max_num_seqs=1, max_waiting=1)
    try:
        lt = run_load_test(LoadTestConfig(s.server.url, 10, input_len=8, output_len=24, api_key="secret",
                                          progress=False))
        no_key = run_load_test(LoadTestConfig(s.server.url, 3, model=MODEL, input_len=8, output_len=2,
                                              progress=False, tokenizer=str(model_dir))).result
        assert (no_key["completed"], no_key["failure_reasons"]) == (0, {"HTTP 401": 3})
    finally:
        s.server.stop()
        s.engine.shutdown(drain=False)
    r = lt.result
    assert r["completed"] + r["failed"] == 10 and r["completed"] >= 1
    assert r["failure_reasons"]["HTTP 429"] == r["failed"] >= 5
    assert all(e == "" or e.startswith("HTTP 429: ") for e in r["errors"])
    assert r["expert_view"]["available"] is False and "HTTP 404" in r["expert_view"]["reason"]


def test_server_stopped_mid_run(model, tok):
    s = serve(model, tok, max_num_seqs=64)

    def stop_after_some():
        deadline = time.monotonic() + 20
        while s.inflight.total < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        s.server.stop()

    stopper = threading.Thread(target=stop_after_some)
    stopper.start()
    try:
        lt = run_load_test(LoadTestConfig(s.server.url, 30, 20.0, model=MODEL, input_len=8, output_len=400,
                                          timeout_s=20, progress=False))
    finally:
        stopper.join()
        s.engine.shutdown(drain=False)
    r = lt.result
    assert r["completed"] + r["failed"] == 30 and len(lt.requests) == 30
    assert r["failure_reasons"].get("stream dropped", 0) >= 1, r["failure_reasons"]
    assert r["failure_reasons"].get("connection refused", 0) >= 10, r["failure_reasons"]
    # a connection accepted just as the server closes is reset rather than refused: also a stop, not a bug
    assert set(r["failure_reasons"]) <= {"stream dropped", "connection refused", "connection error"}, \
        r["failure_reasons"]


FLAKY_BASE = 100  # request k's prompt starts with token FLAKY_BASE + k


class FlakyEngine:
    """Request k (read from its prompt, so arrival order does not matter): k % 4 == 0 fails mid-stream
    (in-band error), 1 is refused (503), 2 hangs, 3 completes 2 tokens."""

    is_alive = True
    max_model_len = max_request_tokens = 512  # MAX_LEN

    async def generate(self, request):
        kind = (request.prompt_ids[0] - FLAKY_BASE) % 4
        if kind == 1:
            raise EngineDeadError("expert 3 unreachable")

        async def stream():
            yield RequestOutput(request.request_id, (TokenOutput(300),), len(request.prompt_ids), 1)
            if kind == 0:
                raise RuntimeError("expert 5 unreachable")
            if kind == 2:
                await asyncio.sleep(30)
            yield RequestOutput(request.request_id, (TokenOutput(301),), len(request.prompt_ids), 2, finished=True,
                                finish_reason="length")
        return stream()

    def abort(self, request_id):
        pass


def test_5xx_in_band_errors_and_timeouts_are_failures_with_reason(tok):
    server = Server(build_app(FlakyEngine(), tok, MODEL))
    try:
        requests = [SampleRequest(prompt=[FLAKY_BASE + k, 7, 8, 9], prompt_len=4, output_len=2) for k in range(8)]
        lt = run_load_test(LoadTestConfig(server.url, 8, 50.0, input_len=4, output_len=2, timeout_s=1.0,
                                          progress=False), requests, model=MODEL)
    finally:
        server.stop()
    r = lt.result
    assert (r["completed"], r["output_lens"][3::4]) == (2, [2, 2])
    assert r["failure_reasons"] == {"stream error (HTTP 500)": 2, "HTTP 503": 2, "timeout": 2}
    assert "expert 5 unreachable" in r["errors"][0] and "expert 3 unreachable" in r["errors"][1]


def test_nothing_listening_all_refused(model_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    lt = run_load_test(LoadTestConfig(url, 5, model="m", input_len=4, output_len=2, progress=False,
                                      tokenizer=str(model_dir)))
    assert (lt.result["completed"], lt.result["failure_reasons"]) == (0, {"connection refused": 5})
    with pytest.raises(ValueError, match="--model"):  # no --model and no /v1/models to ask
        run_load_test(LoadTestConfig(url, 5, input_len=4, output_len=2, progress=False))


def test_ctrl_c_reports_what_was_measured(srv, tmp_path, capsys):
    out = tmp_path / "r.json"
    seen = srv.inflight.total

    def interrupt():  # only once the run is under way (it would take 20 s)
        deadline = time.monotonic() + 10
        while srv.inflight.total < seen + 4:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test installed
    threading.Thread(target=interrupt, daemon=True).start()
    t = time.monotonic()
    try:
        rc = loadtest("--base-url", srv.url, "--num-prompts", "100", "--request-rate", "5", "--input-len", "4",
                      "--output-len", "40", "--result-file", str(out))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130 and time.monotonic() - t < 10
    r = json.loads(out.read_text())
    assert 4 <= r["completed"] + r["failed"] < 100 and r["completed"] >= 1
    assert set(r["failure_reasons"]) <= {"interrupted"}
    assert "Interrupted (Ctrl-C)" in capsys.readouterr().out


def test_sample_request_payload_shapes():
    from bench.loadtest import payload

    cfg = LoadTestConfig("http://x", 1)
    p = payload(cfg, "m", SampleRequest(prompt=[1, 2], prompt_len=2, output_len=5))
    assert p == {"model": "m", "prompt": [1, 2], "max_tokens": 5, "ignore_eos": True, "stream": True,
                 "stream_options": {"include_usage": True}, "temperature": 0.0}
    p = payload(cfg, "m", SampleRequest(messages=[{"role": "user", "content": "a"}], output_len=5, exact=False))
    assert "ignore_eos" not in p and p["messages"][0]["content"] == "a"
