"""`expertmesh loadtest`: the flags, parsed and checked here so a bad value exits 2 naming its flag."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from .loadtest import ENDPOINTS, GOODPUT_METRICS, LoadTestConfig, format_report, run_load_test
from .output_paths import check_output_paths

API_KEY_ENV = "EXPERTMESH_API_KEY"  # the server's variable (`serve` reads it too)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("loadtest", help="load-test an OpenAI-compatible server (vllm bench serve metrics/JSON)",
                       description="Stream requests at a target rate and report TTFT, TPOT, ITL, E2E latency, "
                                   "throughput, goodput and failures; with /metrics, the expert view.")
    p.add_argument("--base-url", required=True, metavar="URL", help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", metavar="PATH", help=" or ".join(ENDPOINTS))
    p.add_argument("--model", metavar="NAME", help="model name (default: the first of /v1/models)")
    p.add_argument("--num-prompts", default="1000", metavar="N", help="requests to send (default 1000)")
    p.add_argument("--request-rate", default="inf", metavar="R", help="requests/s, or inf to send all at once")
    p.add_argument("--burstiness", default="1.0", metavar="B", help="gamma shape of arrivals (1 = Poisson)")
    p.add_argument("--max-concurrency", metavar="C", help="requests in flight at most")
    p.add_argument("--input-len", metavar="I", help="random prompt tokens (default 1024)")
    p.add_argument("--output-len", metavar="O",
                   help="output tokens (default 128; max_tokens for dataset lines without one)")
    p.add_argument("--range-ratio", metavar="X",
                   help="lengths uniform in [len*(1-x), len*(1+x)], x in [0, 1) (default 0)")
    p.add_argument("--dataset", metavar="FILE.jsonl",
                   help='JSONL of {"prompt": ..., "output_len"?: N} or {"messages": [...]} lines')
    p.add_argument("--tokenizer", metavar="DIR",
                   help="draw random prompt ids from this checkpoint's tokenizer.json vocabulary (default: learn the "
                        "served model's vocabulary from its /tokenize and /detokenize)")
    p.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--seed", default="0", metavar="S", help="seeds prompts and arrivals (default 0)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"sent as Authorization: Bearer KEY (default: ${API_KEY_ENV}; prefer it, it keeps the key "
                        "out of the process list)")
    p.add_argument("--result-file", metavar="F.json",
                   help="write the JSON result (vllm bench serve --save-result keys)")
    p.add_argument("--plot", metavar="F.png", help="write a PNG: latency percentiles and output throughput over time")
    p.add_argument("--timeout", default="600", metavar="S", help="seconds per request (default 600)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--kill-worker-every", metavar="S",
                   help="fault injection: kill a random expert worker of the server every S seconds, through Ray "
                        "(needs --ray-address); the report counts the kills")
    p.add_argument("--ray-address", metavar="HOST:PORT", default=os.environ.get("RAY_ADDRESS"),
                   help="the server's Ray cluster (serve prints it as `ray: HOST:PORT`; default $RAY_ADDRESS)")
    p.set_defaults(run=run)


def _num(text: str | None, flag: str, kind: type = int, default: Any = None) -> Any:
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"{flag}: expected {noun}, got {text!r}") from None
    if kind is float and math.isnan(value):
        raise ValueError(f"{flag}: expected a number, got {text!r}")
    return value


def parse_goodput(items: list[str] | None) -> tuple[tuple[str, float], ...]:
    out = []
    for item in items or []:
        metric, sep, ms = item.partition(":")
        try:
            value = float(ms) if sep else None
        except ValueError:
            value = None
        if value is None or metric not in GOODPUT_METRICS:
            raise ValueError(f"--goodput: expected METRIC:MS with METRIC in {list(GOODPUT_METRICS)}, got {item!r}")
        out.append((metric, value))
    return tuple(out)


def config_from_args(args: Any) -> LoadTestConfig:
    if args.dataset and (args.input_len is not None or args.range_ratio is not None):
        raise ValueError("--dataset: cannot be combined with --input-len/--range-ratio (random prompts)")
    cfg = LoadTestConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model,
        num_prompts=_num(args.num_prompts, "--num-prompts"),
        request_rate=_num(args.request_rate, "--request-rate", float),
        burstiness=_num(args.burstiness, "--burstiness", float),
        max_concurrency=_num(args.max_concurrency, "--max-concurrency"),
        input_len=_num(args.input_len, "--input-len", int, 1024),
        output_len=_num(args.output_len, "--output-len", int, 128),
        range_ratio=_num(args.range_ratio, "--range-ratio", float, 0.0),
        dataset=args.dataset, tokenizer=args.tokenizer, goodput=parse_goodput(args.goodput),
        seed=_num(args.seed, "--seed"),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        timeout_s=_num(args.timeout, "--timeout", float), progress=not args.no_progress)
    cfg.validate()
    if cfg.tokenizer and not os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")):
        raise ValueError(f"--tokenizer: no tokenizer.json in {cfg.tokenizer!r}")
    return cfg


def run(args: Any) -> int:
    cfg = config_from_args(args)
    check_output_paths(args.result_file, args.plot)
    if args.plot:
        from . import plot  # fail on a missing matplotlib before the run, not after
    killer = None
    if args.kill_worker_every is not None:
        from .fault_injection import WorkerKiller

        killer = WorkerKiller(_num(args.kill_worker_every, "--kill-worker-every", float), args.ray_address)
        killer.start()
    try:
        lt = run_load_test(cfg)
    finally:
        if killer is not None:
            killer.stop()
    print(format_report(lt))
    if killer is not None:
        lt.result["fault_injection"] = killer.summary()
        print(f"Expert workers killed: {len(killer.kills)} (one every {killer.every_s:g} s)"
              + (f"; {len(killer.errors)} kill attempts failed" if killer.errors else ""))
    if args.result_file:
        lt.save(args.result_file)
        print(f"wrote {args.result_file}", file=sys.stderr)
    if args.plot:
        plot.plot_load_test(lt, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 130 if lt.interrupted else 0
