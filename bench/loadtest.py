"""Streaming load test of an OpenAI-compatible server, reporting like `vllm bench serve` (same JSON keys).

Each request streams (stream_options.include_usage); TTFT is the first chunk with a choice (a chat stream's
bare role announcement aside: a server may send it before any token), ITL the gaps between such chunks, TPOT
(e2e - ttft) / (output_tokens - 1), output tokens the server's usage (else the count of those chunks). A
request completed when its stream ended with [DONE] after a finish_reason, as vLLM's client counts it, text or
not. Random token-id prompts use the served model's vocabulary (bench.datasets.Vocab). Failures are counted by
reason and never stop the run; Ctrl-C keeps what was measured.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np

from . import expert_view as ev
from .datasets import SampleRequest, Vocab, load_dataset, random_requests, server_vocab, tokenizer_vocab

ENDPOINTS = {"/v1/completions": "openai", "/v1/chat/completions": "openai-chat"}  # -> vLLM backend name
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p90", "p99")


@dataclass(frozen=True)
class LoadTestConfig:
    base_url: str
    num_prompts: int = 1000
    request_rate: float = math.inf  # requests/s; inf sends all at once
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first of /v1/models
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 = Poisson
    max_concurrency: int | None = None
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    dataset: str | None = None  # JSONL; replaces the random prompts
    tokenizer: str | None = None  # checkpoint dir whose vocabulary random prompts use; None: ask the server
    goodput: tuple[tuple[str, float], ...] = ()  # (metric, SLO ms), metric in GOODPUT_METRICS
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0  # per request, end to end
    progress: bool = True  # a \r line on stderr when it is a TTY
    ignore_eos: bool = True  # exact output lengths on vLLM-compatible servers
    scrape_metrics: bool = True  # the expert view from <base_url>/metrics

    def validate(self) -> None:
        def bad(flag: str, msg: str) -> ValueError:
            return ValueError(f"{flag}: {msg}")

        if not self.base_url.startswith(("http://", "https://")):
            raise bad("--base-url", f"expected http(s)://host:port, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise bad("--endpoint", f"unknown endpoint {self.endpoint!r}; expected one of {list(ENDPOINTS)}")
        if self.num_prompts < 1:
            raise bad("--num-prompts", f"must be at least 1, got {self.num_prompts}")
        if not self.request_rate > 0:
            raise bad("--request-rate", f"must be > 0 (or inf), got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise bad("--burstiness", f"must be a finite number > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise bad("--max-concurrency", f"must be at least 1, got {self.max_concurrency}")
        for flag, v in (("--input-len", self.input_len), ("--output-len", self.output_len)):
            if v < 1:
                raise bad(flag, f"must be at least 1, got {v}")
        if not 0 <= self.range_ratio < 1:
            raise bad("--range-ratio", f"must be in [0, 1), got {self.range_ratio}")
        for metric, ms in self.goodput:
            if metric not in GOODPUT_METRICS:
                raise bad("--goodput", f"unknown metric {metric!r}; expected one of {list(GOODPUT_METRICS)}")
            if not ms > 0:
                raise bad("--goodput", f"{metric}: the SLO must be > 0 ms, got {ms}")
        if not self.timeout_s > 0:
            raise bad("--timeout", f"must be > 0 seconds, got {self.timeout_s}")


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    start: float = 0.0  # send time, seconds after the run started
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # content chunks, seconds after the run started
    reason: str = ""  # failure class, e.g. "HTTP 429"
    error: str = ""  # failure detail

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class LoadTestResult:
    result: dict[str, Any]  # the vLLM --save-result keys + failure_reasons, expert_view
    requests: tuple[RequestResult, ...]  # the sent requests, in order
    duration: float
    interrupted: bool

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.result, f, indent=2)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (s): 0, then gamma(shape=burstiness, mean=1/rate) gaps; all 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, scale)
    return out


def build_requests(cfg: LoadTestConfig, vocab: Vocab | None = None) -> list[SampleRequest]:
    chat = cfg.endpoint == "/v1/chat/completions"
    if cfg.dataset:
        return load_dataset(cfg.dataset, cfg.num_prompts, chat, cfg.output_len)
    return random_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.range_ratio, cfg.seed, chat, vocab)


def prompt_vocab(cfg: LoadTestConfig, model: str) -> Vocab | None:
    """The vocabulary random token-id prompts draw from (None when the prompts are text)."""
    if cfg.dataset or cfg.endpoint == "/v1/chat/completions":
        return None
    if cfg.tokenizer:
        return tokenizer_vocab(cfg.tokenizer)
    return server_vocab(cfg.base_url, model, _headers(cfg), min(cfg.timeout_s, 30.0))


def _headers(cfg: LoadTestConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def discover_model(cfg: LoadTestConfig) -> str:
    url = cfg.base_url.rstrip("/") + "/v1/models"
    try:
        r = httpx.get(url, headers=_headers(cfg), timeout=min(cfg.timeout_s, 30.0))
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--model: not given and {url} did not list a model ({type(e).__name__}: {e})") from None


def payload(cfg: LoadTestConfig, model: str, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": 0.0}
    if req.messages is not None:
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt
    if req.output_len is not None:
        body["max_tokens"] = req.output_len
        if cfg.ignore_eos and req.exact:
            body["ignore_eos"] = True
    return body


def _classify(e: BaseException) -> str:
    if isinstance(e, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(e, httpx.ConnectError):
        return "connection refused" if _refused(e) else "connection error"
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "stream dropped"
    return f"other ({type(e).__name__})"


def _refused(e: BaseException | None) -> bool:
    """A ConnectionRefusedError anywhere in the cause chain (anyio wraps it in 'All connection attempts failed')."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _token_chunk(obj: dict[str, Any]) -> tuple[bool, bool]:
    """(a generation step: a choice other than a chat stream's bare role announcement, its finish_reason set)."""
    choices = obj.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return False, False
    c = choices[0]
    finished = c.get("finish_reason") is not None
    delta = c.get("delta")
    if isinstance(delta, dict) and "role" in delta and not finished and c.get("logprobs") is None:
        return bool(delta.get("content") or delta.get("reasoning_content")), False
    return True, finished


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str],
                  res: RequestResult, t0: float) -> None:
    """Run one streaming request into res (raising on transport errors)."""
    st = time.perf_counter()
    res.start = st - t0
    usage_tokens = None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode("utf-8", "replace")
            res.reason, res.error = f"HTTP {r.status_code}", f"HTTP {r.status_code}: {text[:300]}"
            return
        last, done, chunks, finished = st, False, 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                res.reason, res.error = "bad stream", f"unparsable chunk: {data[:200]}"
                return
            if isinstance(obj, dict) and obj.get("error"):
                err = obj["error"]
                code = err.get("code") if isinstance(err, dict) else None
                res.reason = f"stream error (HTTP {code})" if code else "stream error"
                res.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                return
            if not isinstance(obj, dict):
                continue
            step, ends = _token_chunk(obj)
            finished |= ends
            if step:
                if chunks == 0:
                    res.ttft = now - st
                else:
                    res.itl.append(now - last)
                res.chunk_times.append(now - t0)
                chunks += 1
                last = now
            usage = obj.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    res.prompt_len = int(usage["prompt_tokens"])
        res.latency = time.perf_counter() - st
        if not done:
            res.reason, res.error = "stream dropped", "the stream ended without data: [DONE]"
        elif not finished:
            res.reason, res.error = "no finish_reason", "the stream ended with [DONE] but no choice had a finish_reason"
        else:
            res.output_tokens = usage_tokens if usage_tokens is not None else chunks
            res.success = True


class _Run:
    """State shared by the request tasks: results so far, progress line."""

    def __init__(self, cfg: LoadTestConfig, total: int):
        self.cfg, self.total = cfg, total
        self.results: dict[int, RequestResult] = {}
        self.done = self.failed = 0
        self.t0 = self.t_end = 0.0
        self.show = cfg.progress and sys.stderr.isatty()
        self._last_draw = 0.0

    def finished(self, res: RequestResult) -> None:
        self.done += 1
        self.failed += not res.success
        self.draw()

    async def tick(self) -> None:
        while True:  # keep the elapsed time moving between completions
            await asyncio.sleep(0.5)
            self.draw()

    def draw(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.show or (not final and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        sys.stderr.write(f"\r[loadtest] {self.done}/{self.total} done, {self.failed} failed, "
                         f"{now - self.t0:.1f} s" + ("\n" if final else ""))
        sys.stderr.flush()


async def _one(client: httpx.AsyncClient, cfg: LoadTestConfig, model: str, i: int, req: SampleRequest,
               run: _Run, sem: asyncio.Semaphore | None) -> None:
    async def go() -> None:
        res = run.results[i] = RequestResult(i, req.prompt_len)
        url = cfg.base_url.rstrip("/") + cfg.endpoint
        try:
            await asyncio.wait_for(_stream(client, url, payload(cfg, model, req), _headers(cfg), res, run.t0),
                                   cfg.timeout_s)
        except asyncio.CancelledError:
            res.success, res.reason, res.error = False, "interrupted", "cancelled by Ctrl-C"
            raise
        except Exception as e:  # every failure is a counted result, never a crash
            res.success, res.reason, res.error = False, _classify(e), f"{type(e).__name__}: {e}"[:300]
        run.finished(res)

    if sem is None:
        await go()
    else:
        async with sem:
            await go()


async def _drive(cfg: LoadTestConfig, model: str, requests: list[SampleRequest], run: _Run) -> None:
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    offsets = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    tasks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, pool=None), limits=limits) as client:
        run.t0 = time.perf_counter()
        ticker = [asyncio.create_task(run.tick())] if run.show else []
        try:
            for i, (req, at) in enumerate(zip(requests, offsets, strict=True)):
                delay = run.t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(client, cfg, model, i, req, run, sem)))
            await asyncio.gather(*tasks)
        finally:  # on Ctrl-C (cancellation) the in-flight requests are cancelled and recorded as such
            run.t_end = time.perf_counter()
            for t in tasks + ticker:
                t.cancel()
            await asyncio.gather(*tasks, *ticker, return_exceptions=True)
            run.draw(final=True)


def run_load_test(cfg: LoadTestConfig, requests: list[SampleRequest] | None = None,
                  model: str | None = None) -> LoadTestResult:
    """Run the load test (blocking); Ctrl-C stops it early and returns what was measured."""
    cfg.validate()
    model = model or cfg.model or discover_model(cfg)
    requests = requests if requests is not None else build_requests(cfg, prompt_vocab(cfg, model))
    before, why = ev.scrape(cfg.base_url, headers=_headers(cfg)) if cfg.scrape_metrics else (None, "disabled")
    run = _Run(cfg, len(requests))
    interrupted = False
    try:
        asyncio.run(_drive(cfg, model, requests, run))
    except KeyboardInterrupt:
        interrupted = True
    if not run.t_end:
        run.t_end = time.perf_counter()
    after, why_after = ev.scrape(cfg.base_url, headers=_headers(cfg)) if before is not None else (None, why)
    view = ev.expert_view(before, after, why or why_after)
    results = tuple(run.results[i] for i in sorted(run.results))
    duration = max(run.t_end - run.t0, 1e-9)
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": ENDPOINTS[cfg.endpoint],
              "model_id": model, "num_prompts": cfg.num_prompts,
              "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
              "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency,
              **compute_metrics(results, duration, dict(cfg.goodput)), "expert_view": view}
    return LoadTestResult(result, results, duration, interrupted)


def compute_metrics(results: tuple[RequestResult, ...] | list[RequestResult], duration: float,
                    goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """The vLLM result keys (throughputs, per-request lists, mean/median/std/p90/p99 in ms) + failure_reasons."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = None
    if goodput:
        def meets(r: RequestResult) -> bool:
            values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
            return all(1e3 * values[m] <= slo for m, slo in goodput.items())

        good = sum(meets(r) for r in ok) / duration
    out: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "request_goodput": good,
        "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
        "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
    }
    for name, values in zip(METRICS, (ttfts, tpots, itls, e2els), strict=True):
        a = np.asarray(values or [0.0]) * 1e3
        out.update({f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
                    f"std_{name}_ms": float(a.std()), f"p90_{name}_ms": float(np.percentile(a, 90)),
                    f"p99_{name}_ms": float(np.percentile(a, 99))})
    out["failure_reasons"] = dict(Counter(r.reason for r in results if not r.success).most_common())
    return out


def format_report(lt: LoadTestResult) -> str:
    r = lt.result
    w = 50
    lines = [" Serving Benchmark Result ".center(w, "=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    if lt.interrupted:
        row("Interrupted (Ctrl-C) after sending:", f"{len(lt.requests)}/{r['num_prompts']}")
    row("Successful requests:", r["completed"])
    row("Failed requests:", r["failed"])
    row("Benchmark duration (s):", r["duration"])
    row("Total input tokens:", r["total_input_tokens"])
    row("Total generated tokens:", r["total_output_tokens"])
    row("Request throughput (req/s):", r["request_throughput"])
    if r["request_goodput"] is not None:
        row("Request goodput (req/s):", r["request_goodput"])
    row("Output token throughput (tok/s):", r["output_throughput"])
    row("Total Token throughput (tok/s):", r["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for m in METRICS:
        lines.append(titles[m].center(w, "-"))
        for s in STATS:
            row(f"{s.capitalize() if s != 'p90' and s != 'p99' else s.upper()} {m.upper()} (ms):",
                r[f"{s}_{m}_ms"])
    if r["failure_reasons"]:
        lines.append("Failures".center(w, "-"))
        for reason, n in r["failure_reasons"].items():
            row(f"{reason}:", n)
    lines.append("Expert view".center(w, "-"))
    lines.append(ev.format_view(r["expert_view"]))
    lines.append("=" * w)
    return "\n".join(lines)
