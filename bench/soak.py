"""Soak benchmark: an ExpertCluster serving a steady, bounded-concurrency mix of completion requests for a fixed
time, sampled every window for leaks and drift.

The mix (fixed seed): streaming and non-streaming completions with random prompt and output lengths (token ids
from the model's vocabulary), every `bad_every`-th request deliberately invalid (expects a 400), and every
`drop_every`-th one a client that disconnects mid-request (streaming: after a few chunks; non-streaming: after
a short random delay), so the server's error and abort paths run all the time. Each window records the router's
resident memory (and the expert workers'), completions, unexpected errors, deliberate 4xx, end-to-end latency
and TTFT percentiles, and the KV blocks in use. The RSS baseline is taken after the warm-up windows; the
summary compares the last window against it (target: < 5% growth over 30 minutes).

The load targets only the cluster's own server on 127.0.0.1, stops sending at the deadline (or after
`max_requests`), and waits at most `request_timeout_s` for the requests still in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .loadtest import _classify

LOOPBACK = "http://127.0.0.1:"
RSS_TARGET_PCT = 5.0  # over 30 minutes
BAD_VARIANTS = ("temperature", "top_p", "max_tokens", "token_id", "context", "json")


@dataclass(frozen=True)
class SoakBench:
    model_dir: str
    minutes: float = 30.0  # the whole run, warm-up included
    workers: int = 2
    window_s: float = 15.0
    warmup_s: float = 20.0  # rounded up to whole windows; the RSS baseline is sampled at its end
    max_concurrency: int = 8
    prompt_len: tuple[int, int] = (4, 96)  # uniform, clipped to the model's context
    output_len: tuple[int, int] = (1, 48)
    stream_fraction: float = 0.5  # of the ordinary requests
    ignore_eos_fraction: float = 0.8  # the rest may stop early at EOS
    bad_every: int = 20  # every Nth request is invalid on purpose (400 expected)
    drop_every: int = 12  # every Nth request's client disconnects mid-request
    dtype: str | None = None  # None: the checkpoint's torch_dtype
    kv_cache_mb: int = 256
    request_timeout_s: float = 60.0
    max_requests: int = 1_000_000  # hard ceiling on requests sent
    router_cpus: int = 1
    worker_cpus: int = 1
    seed: int = 0

    def validate(self) -> None:
        def bad(flag: str, msg: str) -> ValueError:
            return ValueError(f"{flag}: {msg}")

        if not (math.isfinite(self.minutes) and self.minutes > 0):
            raise bad("--minutes", f"must be a number > 0, got {self.minutes}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise bad("--soak-window-s", f"must be a number > 0, got {self.window_s}")
        if not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise bad("--soak-warmup-s", f"must be a number >= 0, got {self.warmup_s}")
        for flag, v in (("--soak-workers", self.workers), ("--soak-concurrency", self.max_concurrency)):
            if v < 1:
                raise bad(flag, f"must be at least 1, got {v}")
        if self.num_windows <= self.warmup_windows:
            raise bad("--minutes", f"{self.minutes:g} min ({self.duration_s:.0f} s) leaves no window after the "
                                   f"{self.warmup_windows * self.window_s:g} s warm-up; give more minutes or a "
                                   f"shorter --soak-warmup-s / --soak-window-s")
        for name, (lo, hi) in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise bad(name, f"expected 1 <= min <= max, got {(lo, hi)}")
        if self.bad_every < 2 or self.drop_every < 2:
            raise bad("bad_every/drop_every", "must be at least 2")

    @property
    def duration_s(self) -> float:
        return 60.0 * self.minutes

    @property
    def warmup_windows(self) -> int:
        return math.ceil(self.warmup_s / self.window_s - 1e-9) if self.warmup_s > 0 else 0

    @property
    def num_windows(self) -> int:
        return math.ceil(self.duration_s / self.window_s - 1e-9)

    def boundaries(self) -> list[float]:
        """Window ends in seconds after the start; the last one is the deadline (a shorter window if need be)."""
        return [min((k + 1) * self.window_s, self.duration_s) for k in range(self.num_windows)]


# ---- requests --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One request to send."""

    kind: str  # ok | bad | drop
    stream: bool
    body: dict[str, Any] | None  # None: send raw (an invalid JSON body)
    max_tokens: int = 0
    exact: bool = False  # ignore_eos: exactly max_tokens tokens
    drop_after: float = 0.0  # drop: chunks to read (streaming) or seconds to wait (non-streaming)
    variant: str = ""  # bad: what is wrong with it


class Mix:
    """The seeded request sequence."""

    def __init__(self, cfg: SoakBench, vocab_size: int, max_model_len: int):
        self.cfg, self.vocab, self.max_len = cfg, vocab_size, max_model_len
        self.rng = random.Random(cfg.seed)
        self.prompt_hi = max(1, min(cfg.prompt_len[1], max_model_len // 2))
        self.prompt_lo = min(cfg.prompt_len[0], self.prompt_hi)
        self.out_hi = max(1, min(cfg.output_len[1], max_model_len - self.prompt_hi - 1))
        self.out_lo = min(cfg.output_len[0], self.out_hi)
        self.sent = 0

    def _ids(self, n: int) -> list[int]:
        lo = 3 if self.vocab > 3 else 0  # above the usual special ids (pad, BOS, EOS)
        return [self.rng.randrange(lo, self.vocab) for _ in range(n)]

    def next(self) -> Spec:
        i, rng, cfg = self.sent, self.rng, self.cfg
        self.sent += 1
        stream = rng.random() < cfg.stream_fraction
        prompt = self._ids(rng.randint(self.prompt_lo, self.prompt_hi))
        body: dict[str, Any] = {"prompt": prompt, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if i % cfg.bad_every == cfg.bad_every - 1:
            return self._bad(body, stream)
        if i % cfg.drop_every == cfg.drop_every - 1:
            body.update(max_tokens=self.out_hi, ignore_eos=True, temperature=0.0)
            drop = rng.randint(1, 3) if stream else rng.uniform(0.02, 0.3)
            return Spec("drop", stream, body, self.out_hi, True, drop)
        max_tokens = rng.randint(self.out_lo, self.out_hi)
        exact = rng.random() < cfg.ignore_eos_fraction
        temperature = rng.choice((0.0, 0.0, 0.7, 1.0))
        body.update(max_tokens=max_tokens, temperature=temperature, ignore_eos=exact)
        if temperature > 0:
            body["seed"] = rng.randrange(2**31)
        return Spec("ok", stream, body, max_tokens, exact)

    def _bad(self, body: dict[str, Any], stream: bool) -> Spec:
        variant = self.rng.choice(BAD_VARIANTS)
        body["max_tokens"] = self.out_lo
        if variant == "temperature":
            body["temperature"] = -1.0
        elif variant == "top_p":
            body["top_p"] = 0.0
        elif variant == "max_tokens":
            body["max_tokens"] = 0
        elif variant == "token_id":
            body["prompt"] = [*body["prompt"][:-1], self.vocab]  # one past the vocabulary
        elif variant == "context":
            body["prompt"] = self._ids(self.max_len)  # no room left for a completion
        else:
            return Spec("bad", stream, None, variant=variant)
        return Spec("bad", stream, body, variant=variant)


@dataclass
class Outcome:
    kind: str
    status: str  # ok | rejected | dropped | error
    reason: str = ""  # for errors
    latency: float | None = None  # seconds, ok only
    ttft: float | None = None  # seconds, streaming ok only
    tokens: int = 0


async def _read_stream(r: httpx.Response, st: float, spec: Spec) -> Outcome:
    """A 200 SSE stream to its end (or, for a drop, until `drop_after` token chunks, then hang up)."""
    ttft, chunks, usage, done = None, 0, None, False
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            return Outcome(spec.kind, "error", "bad stream chunk")
        if not isinstance(obj, dict):
            continue
        if obj.get("error"):
            err = obj["error"]
            code = err.get("code") if isinstance(err, dict) else None
            return Outcome(spec.kind, "error", f"stream error (HTTP {code})" if code else "stream error")
        if obj.get("choices"):
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - st
            if spec.kind == "drop" and chunks >= spec.drop_after:
                return Outcome("drop", "dropped")  # leaving the response context closes the connection
        if isinstance(obj.get("usage"), dict):
            usage = obj["usage"].get("completion_tokens")
    if spec.kind == "drop":
        return Outcome("drop", "dropped")  # finished before the client hung up
    if not done:
        return Outcome(spec.kind, "error", "stream ended without [DONE]")
    return _checked(spec, usage, time.perf_counter() - st, ttft)


def _checked(spec: Spec, tokens: Any, latency: float, ttft: float | None = None) -> Outcome:
    if not isinstance(tokens, int):
        return Outcome(spec.kind, "error", "no usage.completion_tokens")
    if (tokens != spec.max_tokens) if spec.exact else not 1 <= tokens <= spec.max_tokens:
        return Outcome(spec.kind, "error", "wrong output length")
    return Outcome(spec.kind, "ok", latency=latency, ttft=ttft, tokens=tokens)


def _accepted(spec: Spec) -> Outcome:
    return Outcome("bad", "error", f"HTTP 200 for an invalid request ({spec.variant})")


def _by_status(spec: Spec, code: int) -> Outcome:
    """A non-200 answer: expected for a deliberately invalid request when it is a 400."""
    if spec.kind == "bad" and code == 400:
        return Outcome("bad", "rejected")
    return Outcome(spec.kind, "error", f"HTTP {code}" + (f" ({spec.variant})" if spec.variant else ""))


async def _send(client: httpx.AsyncClient, url: str, spec: Spec) -> Outcome:
    st = time.perf_counter()
    if spec.body is None:
        r = await client.post(url, content=b'{"prompt": [5, 6', headers={"Content-Type": "application/json"})
        return _by_status(spec, r.status_code) if r.status_code != 200 else _accepted(spec)
    if spec.stream:
        async with client.stream("POST", url, json=spec.body) as r:
            if r.status_code != 200:
                await r.aread()
                return _by_status(spec, r.status_code)
            if spec.kind == "bad":
                return _accepted(spec)
            return await _read_stream(r, st, spec)
    r = await client.post(url, json=spec.body)
    if r.status_code != 200:
        return _by_status(spec, r.status_code)
    if spec.kind == "bad":
        return _accepted(spec)
    try:
        usage = r.json().get("usage") or {}
    except (ValueError, AttributeError):
        return Outcome(spec.kind, "error", "unparsable JSON response")
    return _checked(spec, usage.get("completion_tokens"), time.perf_counter() - st)


async def _drop_plain(url: str, spec: Spec, timeout: httpx.Timeout) -> Outcome:
    """A non-streaming request whose client gives up after spec.drop_after seconds (its own connection)."""
    async with httpx.AsyncClient(timeout=timeout) as own:
        try:
            r = await asyncio.wait_for(own.post(url, json=spec.body), spec.drop_after)
        except asyncio.TimeoutError:
            return Outcome("drop", "dropped")
    return Outcome("drop", "dropped") if r.status_code == 200 else _by_status(spec, r.status_code)


async def _drop_stream(url: str, spec: Spec, timeout: httpx.Timeout) -> Outcome:
    async with httpx.AsyncClient(timeout=timeout) as own:  # its own connection, closed on the way out
        return await _send(own, url, spec)


# ---- the run ---------------------------------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of a local process in MiB (/proc/<pid>/status VmRSS); None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Probe:
    """The router and worker processes (pids on this node) and the router's engine stats."""

    def __init__(self, cluster: Any):
        import ray

        here = ray.get_runtime_context().get_node_id()
        self.router = cluster.router
        info = ray.get(self.router.info.remote(), timeout=60)
        self.router_pid = info["pid"] if info.get("node_id") == here else None
        self.worker_pids = [i["pid"] for i in cluster.worker_infos() if i.get("node_id") == here]

    def rss(self) -> tuple[float | None, float | None]:
        workers = [rss_mb(p) for p in self.worker_pids]
        total = None if not workers or None in workers else sum(workers)  # type: ignore[arg-type]
        return rss_mb(self.router_pid), total

    async def engine(self) -> dict | None:
        import ray

        try:
            return await asyncio.to_thread(ray.get, self.router.engine_stats.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a window row with no engine figures, the load goes on
            return None


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else None


@dataclass
class _Load:
    cfg: SoakBench
    mix: Mix
    url: str
    deadline: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: bool = False

    def more(self) -> bool:
        return not self.stopping and time.perf_counter() < self.deadline and self.mix.sent < self.cfg.max_requests

    async def client(self, shared: httpx.AsyncClient, timeout: httpx.Timeout) -> None:
        while self.more():
            spec = self.mix.next()
            try:
                if spec.kind == "drop":
                    coro = _drop_stream(self.url, spec, timeout) if spec.stream else \
                        _drop_plain(self.url, spec, timeout)
                else:
                    coro = _send(shared, self.url, spec)
                out = await asyncio.wait_for(coro, self.cfg.request_timeout_s)
            except Exception as e:  # every failure is a counted outcome, never a crash
                out = Outcome(spec.kind, "error", _classify(e))
            self.outcomes.append(out)


def _window_row(k: int, phase: str, elapsed: float, length: float, outs: list[Outcome],
                rss: tuple[float | None, float | None], eng: dict | None) -> dict:
    ok = [o for o in outs if o.status == "ok"]
    errors = [o.reason for o in outs if o.status == "error"]
    return {
        "window": k, "phase": phase, "elapsed_s": elapsed, "router_rss_mb": rss[0], "workers_rss_mb": rss[1],
        "completed": len(ok), "req_s": len(ok) / length if length > 0 else 0.0,
        "out_tok_s": sum(o.tokens for o in ok) / length if length > 0 else 0.0,
        "errors": len(errors), "rejected_4xx": sum(o.status == "rejected" for o in outs),
        "dropped": sum(o.status == "dropped" for o in outs),
        "e2e_p50_ms": _pct([o.latency for o in ok if o.latency is not None], 50),
        "e2e_p99_ms": _pct([o.latency for o in ok if o.latency is not None], 99),
        "ttft_p50_ms": _pct([o.ttft for o in ok if o.ttft is not None], 50),
        "ttft_p99_ms": _pct([o.ttft for o in ok if o.ttft is not None], 99),
        "kv_blocks_used": None if eng is None else eng["num_kv_blocks"] - eng["num_free_blocks"],
        "running": None if eng is None else eng["num_running"],
        "_error_reasons": errors,
    }


async def _settled(probe: Probe, timeout_s: float = 10.0) -> dict | None:
    """Engine stats once nothing runs or waits (aborts of dropped requests land a moment later)."""
    end = time.monotonic() + timeout_s
    while True:
        eng = await probe.engine()
        if eng is None or (eng["num_running"] == 0 and eng["num_waiting"] == 0) or time.monotonic() > end:
            return eng
        await asyncio.sleep(0.2)


async def _drive(cfg: SoakBench, load: _Load, probe: Probe, log) -> tuple[list[dict], dict | None]:
    timeout = httpx.Timeout(cfg.request_timeout_s)
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    rows: list[dict] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as shared:
        t0 = time.perf_counter()
        load.deadline = t0 + cfg.duration_s
        tasks = [asyncio.create_task(load.client(shared, timeout)) for _ in range(cfg.max_concurrency)]
        try:
            seen, last = 0, 0.0
            for k, end in enumerate(cfg.boundaries(), 1):
                await asyncio.sleep(max(0.0, t0 + end - time.perf_counter()))
                outs, seen = load.outcomes[seen:], len(load.outcomes)
                rss = probe.rss()
                phase = "warmup" if k <= cfg.warmup_windows else "soak"
                rows.append(_window_row(k, phase, time.perf_counter() - t0, end - last, outs, rss,
                                        await probe.engine()))
                last = end
                log(_progress_line(rows[-1]))
            load.stopping = True  # the clients finish their current request and stop
            t_drain = time.perf_counter()
            _, pending = await asyncio.wait(tasks, timeout=cfg.request_timeout_s + 5)
            for t in pending:
                t.cancel()
            eng = await _settled(probe)
            drain = _window_row(len(rows) + 1, "drain", time.perf_counter() - t0, time.perf_counter() - t_drain,
                                load.outcomes[seen:], probe.rss(), eng)
            rows.append(drain)
            log(_progress_line(drain))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return rows, eng


def _progress_line(r: dict) -> str:
    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    return (f"[soak] {r['phase']:<6} window {r['window']:>3} @ {r['elapsed_s']:7.1f} s: router RSS "
            f"{f(r['router_rss_mb'])} MiB, {r['completed']} done, {r['errors']} errors, {r['rejected_4xx']} 4xx, "
            f"{r['dropped']} dropped, e2e p50/p99 {f(r['e2e_p50_ms'], '.0f')}/{f(r['e2e_p99_ms'], '.0f')} ms, "
            f"KV blocks {f(r['kv_blocks_used'], 'd')}")


def _growth(base: float | None, final: float | None) -> float | None:
    return None if base is None or final is None or base <= 0 else 100.0 * (final - base) / base


def summarize(cfg: SoakBench, rows: list[dict], sent: int, after: dict | None) -> dict:
    soak = [r for r in rows if r["phase"] == "soak"]
    warm = [r for r in rows if r["phase"] == "warmup"]
    base_row = warm[-1] if warm else soak[0]  # RSS baseline: the end of the warm-up (else the first window)
    router = [r["router_rss_mb"] for r in soak + rows[-1:] if r["router_rss_mb"] is not None]
    reasons: dict[str, int] = {}
    for r in rows:
        for why in r["_error_reasons"]:
            reasons[why] = reasons.get(why, 0) + 1
    first, last = soak[0], soak[-1]
    growth = _growth(base_row["router_rss_mb"], last["router_rss_mb"])
    return {
        "minutes": cfg.minutes, "workers": cfg.workers, "max_concurrency": cfg.max_concurrency,
        "window_s": cfg.window_s, "warmup_s": cfg.warmup_windows * cfg.window_s, "requests_sent": sent,
        "completed": sum(r["completed"] for r in rows), "unexpected_errors": sum(r["errors"] for r in rows),
        "error_reasons": reasons, "rejected_4xx": sum(r["rejected_4xx"] for r in rows),
        "dropped": sum(r["dropped"] for r in rows),
        "router_rss_baseline_mb": base_row["router_rss_mb"], "router_rss_final_mb": last["router_rss_mb"],
        "router_rss_max_mb": max(router) if router else None, "router_rss_growth_pct": growth,
        "rss_target_pct": RSS_TARGET_PCT,
        "rss_within_target": None if growth is None else growth < RSS_TARGET_PCT,
        "workers_rss_baseline_mb": base_row["workers_rss_mb"], "workers_rss_final_mb": last["workers_rss_mb"],
        "workers_rss_growth_pct": _growth(base_row["workers_rss_mb"], last["workers_rss_mb"]),
        "e2e_p99_first_ms": first["e2e_p99_ms"], "e2e_p99_last_ms": last["e2e_p99_ms"],
        "e2e_p99_drift_pct": _growth(first["e2e_p99_ms"], last["e2e_p99_ms"]),
        "ttft_p99_first_ms": first["ttft_p99_ms"], "ttft_p99_last_ms": last["ttft_p99_ms"],
        "ttft_p99_drift_pct": _growth(first["ttft_p99_ms"], last["ttft_p99_ms"]),
        "kv_blocks_total": None if after is None else after["num_kv_blocks"],
        "kv_blocks_used_after_drain": None if after is None else after["num_kv_blocks"] - after["num_free_blocks"],
        "running_after_drain": None if after is None else after["num_running"],
        "waiting_after_drain": None if after is None else after["num_waiting"],
    }


def format_summary(s: dict) -> str:
    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    verdict = {None: "n/a", True: "within", False: "ABOVE"}[s["rss_within_target"]]
    reasons = ", ".join(f"{k}: {v}" for k, v in s["error_reasons"].items())
    return "\n".join([
        f"soak summary: {s['minutes']:g} min, {s['workers']} workers, concurrency {s['max_concurrency']}, "
        f"{s['window_s']:g} s windows after a {s['warmup_s']:g} s warm-up",
        f"  requests sent {s['requests_sent']}: completed {s['completed']}, deliberate 4xx {s['rejected_4xx']}, "
        f"client disconnects {s['dropped']}, unexpected errors {s['unexpected_errors']}"
        + (f" ({reasons})" if reasons else ""),
        f"  router RSS: baseline {f(s['router_rss_baseline_mb'])} MiB, final {f(s['router_rss_final_mb'])}, "
        f"max {f(s['router_rss_max_mb'])}, growth {f(s['router_rss_growth_pct'], '+.2f')}% "
        f"({verdict} the < {s['rss_target_pct']:g}% target, which is set over 30 min)",
        f"  worker RSS (sum): baseline {f(s['workers_rss_baseline_mb'])} MiB, final "
        f"{f(s['workers_rss_final_mb'])}, growth {f(s['workers_rss_growth_pct'], '+.2f')}%",
        f"  p99 drift, first to last soak window: e2e {f(s['e2e_p99_first_ms'], '.0f')} -> "
        f"{f(s['e2e_p99_last_ms'], '.0f')} ms ({f(s['e2e_p99_drift_pct'], '+.1f')}%), TTFT "
        f"{f(s['ttft_p99_first_ms'], '.0f')} -> {f(s['ttft_p99_last_ms'], '.0f')} ms "
        f"({f(s['ttft_p99_drift_pct'], '+.1f')}%)",
        f"  after drain: KV blocks in use {f(s['kv_blocks_used_after_drain'], 'd')} of "
        f"{f(s['kv_blocks_total'], 'd')}, running {f(s['running_after_drain'], 'd')}, waiting "
        f"{f(s['waiting_after_drain'], 'd')}",
    ])


def run_soak_bench(cfg: SoakBench, log=print) -> dict:
    """Bring up the cluster and its server on 127.0.0.1, soak it, tear it down.

    Returns {"model", "windows": [row per window, the warm-up and a final drain row included], "summary"}.
    """
    import ray

    from cluster.deployment import ClusterConfig, ExpertCluster
    from model.config import MixtralConfig
    from model.loader import DTYPES
    from router.scheduler import EngineConfig
    from router.server import ServerConfig

    cfg.validate()
    model_cfg = MixtralConfig.from_file(cfg.model_dir)
    dtype = cfg.dtype or (model_cfg.torch_dtype if model_cfg.torch_dtype in DTYPES else "float32")
    engine = EngineConfig(kv_cache_bytes=cfg.kv_cache_mb << 20, max_num_seqs=cfg.max_concurrency)
    max_len = engine.model_len(model_cfg)
    mix = Mix(cfg, model_cfg.vocab_size, max_len)
    cluster_cfg = ClusterConfig(cfg.model_dir, cfg.workers, dtype, router_cpus=cfg.router_cpus,
                                worker_cpus=cfg.worker_cpus)
    with ExpertCluster(cluster_cfg) as c:
        base = ray.get(c.router.start_server.remote(ServerConfig(host="127.0.0.1", port=0, engine=engine)))
        if not base.startswith(LOOPBACK):
            raise RuntimeError(f"soak: the server is at {base}, not on 127.0.0.1; refusing to load it")
        probe = Probe(c)
        log(f"[soak] {Path(cfg.model_dir).name} ({dtype}) at {base} with {cfg.workers} workers: "
            f"{cfg.minutes:g} min, concurrency {cfg.max_concurrency}, {cfg.window_s:g} s windows, "
            f"router pid {probe.router_pid}, worker pids {probe.worker_pids}")
        load = _Load(cfg, mix, base + "/v1/completions")
        rows, after = asyncio.run(_drive(cfg, load, probe, log))
        ray.get(c.router.stop_server.remote(), timeout=120)
    summary = summarize(cfg, rows, mix.sent, after)
    for r in rows:
        del r["_error_reasons"]
    return {"model": cfg.model_dir, "windows": rows, "summary": summary}
