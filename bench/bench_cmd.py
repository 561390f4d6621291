"""`expertmesh bench`: every README figure from one command (offline decode, distributed, serving), and the soak,
burst, rebalance and failover runs on request (`--sections soak --minutes M`, ...)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

SECTIONS = ("decode", "distributed", "serving", "soak", "burst", "rebalance", "failover")
DEFAULT_SECTIONS = "decode,distributed,serving"  # soak, burst, rebalance and failover run only when asked for
SOAK_FLAGS = ("minutes", "soak_workers", "soak_window_s", "soak_warmup_s", "soak_concurrency")


def add_parser(sub) -> None:
    from cluster.cli_args import positive_int

    p = sub.add_parser("bench", help="benchmarks: in-process vs HF, workers vs in-process, serving vs HF")
    p.add_argument("--model", help="checkpoint dir (default: the `bench` preset in bf16, written once to the cache)")
    p.add_argument("--sections", default=DEFAULT_SECTIONS,
                   help=f"comma-separated of {SECTIONS} (default {DEFAULT_SECTIONS}; the others only when named)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="decode section dtypes")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompt-len", type=positive_int, default=16)
    p.add_argument("--gen-len", type=positive_int, default=32)
    p.add_argument("--workers", default="2,4", help="distributed section worker counts")
    p.add_argument("--serving-workers", type=positive_int, default=4)
    p.add_argument("--num-prompts", type=positive_int, default=128, help="serving section requests")
    p.add_argument("--repeats", type=positive_int,
                   help="decode and distributed sections: best of N interleaved runs (default 2 and 3)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers baselines")
    p.add_argument("--hf-experts", default="eager,grouped_mm,batched_mm",
                   help="decode section: HF experts implementations to time; the fastest is the baseline "
                        "(batched_mm only where its weight gather fits in 2 GiB)")
    p.add_argument("--device", default="cpu", help="decode section: cpu, or cuda[:N] (ours and HF both there)")
    p.add_argument("--experts-impl", default="auto", choices=("auto", "per_expert", "grouped_mm", "padded"),
                   help="decode section, ours: per_expert (measured CPU kernel plans), grouped_mm or padded "
                        "(stacked weights, no host sync); auto: per_expert on CPU, grouped on GPU")
    p.add_argument("--json", help="also write all rows to this JSON file")
    soak = p.add_argument_group("soak section", "steady mixed load on a cluster, RSS and latency sampled per window "
                                                "(model: the tiny preset unless --model)")
    soak.add_argument("--minutes", metavar="M", help="soak length in minutes, warm-up included (default 30)")
    soak.add_argument("--soak-workers", type=positive_int, help="expert workers (default 2)")
    soak.add_argument("--soak-window-s", metavar="S", help="sampling window in seconds (default 15)")
    soak.add_argument("--soak-warmup-s", metavar="S",
                      help="warm-up before the RSS baseline, rounded up to whole windows (default 20)")
    soak.add_argument("--soak-concurrency", type=positive_int, help="requests in flight (default 8)")
    p.set_defaults(run=run)


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: values must be positive, got {text!r}")
    return values


def hf_experts_list(text: str) -> tuple[str, ...]:
    from .offline import HF_EXPERTS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in HF_EXPERTS]
    if bad or not names:
        raise ValueError(f"--hf-experts: {bad or text!r} not in {HF_EXPERTS}")
    return names


def device_arg(text: str) -> str:
    """--device: cpu or an available CUDA device."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def number(text: str, flag: str, minimum: float = 0.0, strict: bool = True) -> float:
    """A finite float above (or, strict=False, at least) minimum, else a ValueError naming the flag."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag}: expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{flag}: expected a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
    return value


def soak_config(args, model: str | None):
    from .soak import SoakBench

    if model is None:
        from cluster.serve_cmd import cached_checkpoint

        model = str(cached_checkpoint("tiny"))
    kw: dict[str, Any] = {}
    if args.minutes is not None:
        kw["minutes"] = number(args.minutes, "--minutes")
    if args.soak_window_s is not None:
        kw["window_s"] = number(args.soak_window_s, "--soak-window-s")
    if args.soak_warmup_s is not None:
        kw["warmup_s"] = number(args.soak_warmup_s, "--soak-warmup-s", strict=False)
    if args.soak_workers is not None:
        kw["workers"] = args.soak_workers
    if args.soak_concurrency is not None:
        kw["max_concurrency"] = args.soak_concurrency
    cfg = SoakBench(model, **kw)
    cfg.validate()
    return cfg


def bench_model_dir() -> Path:
    from cluster.serve_cmd import cached_checkpoint

    return cached_checkpoint("bench", dtype="bfloat16")


def run(args) -> int:
    from model.loader import parse_dtype

    from .offline import (
        DecodeBench,
        DistributedBench,
        format_kernels,
        format_table,
        run_decode_bench,
        run_distributed_bench,
    )
    from .serving import ServingBench, run_serving_bench

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"--sections: {unknown or sections} not in {SECTIONS}")
    given = [f"--{f.replace('_', '-')}" for f in SOAK_FLAGS if getattr(args, f, None) is not None]
    if given and "soak" not in sections:
        raise ValueError(f"{', '.join(given)}: only used by the soak section; add soak to --sections")
    soak_cfg = soak_config(args, args.model) if "soak" in sections else None  # checked before any section runs
    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    for d in dtypes:
        parse_dtype(d)
    batches = int_list(args.batch_sizes, "--batch-sizes")
    hf_experts = hf_experts_list(args.hf_experts)
    device = device_arg(args.device)
    workers = int_list(args.workers, "--workers")
    others = [s for s in sections if s not in ("soak", "burst", "rebalance", "failover")]
    tiny = None  # soak and burst default to the tiny model
    if "burst" in sections or "failover" in sections:
        from cluster.serve_cmd import cached_checkpoint

        tiny = str(Path(args.model) if args.model else cached_checkpoint("tiny"))
    model_dir = str(Path(args.model) if args.model else bench_model_dir()) if others else \
        (soak_cfg.model_dir if soak_cfg is not None else tiny)
    repeats = {} if args.repeats is None else {"repeats": args.repeats}
    log = lambda row: print(row, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {}
    if "decode" in sections:
        decode = run_decode_bench(DecodeBench(model_dir, dtypes, batches, args.prompt_len, args.gen_len,
                                              hf=not args.no_hf, hf_experts=hf_experts, device=device,
                                              experts_impl=args.experts_impl, **repeats), log)
        report["decode"] = decode.pop("rows")
        report["decode_kernels"] = decode  # CPU, threads and the kernel plan per weight
        print(format_kernels(decode))
        print(format_table(report["decode"], "in-process decode tokens/s (prefill included) vs HF transformers "
                                             "(its fastest experts implementation)"))
    if "distributed" in sections:
        report["distributed"] = run_distributed_bench(
            DistributedBench(model_dir, workers, batches, "bfloat16", args.prompt_len, args.gen_len,
                             **repeats), log)
        print(format_table(report["distributed"], "bf16 decode through expert workers vs in-process"))
    if "serving" in sections:
        report["serving"] = run_serving_bench(ServingBench(model_dir, args.serving_workers,
                                                           num_prompts=args.num_prompts, hf=not args.no_hf), log)
        print(format_table(report["serving"], "serving: load test at max concurrency 32 vs HF static batches"))
    if soak_cfg is not None:
        from .soak import format_summary, run_soak_bench

        report["soak"] = run_soak_bench(soak_cfg, log)
        title = f"soak: {Path(soak_cfg.model_dir).name}, {soak_cfg.workers} workers, per {soak_cfg.window_s:g} s window"
        print(format_table(report["soak"]["windows"], title))
        print(format_summary(report["soak"]["summary"]), flush=True)
    if "burst" in sections:
        from .burst import BurstBench, run_burst_bench

        report["burst"] = run_burst_bench(BurstBench(tiny), log)
        print(format_table(report["burst"], "burst: 20x the waiting-queue bound at once, 3 rounds; router RSS"))
    if "rebalance" in sections:  # its own skewed tiny checkpoint
        from .rebalance import RebalanceBench, run_rebalance_bench, skewed_checkpoint

        report["rebalance"] = run_rebalance_bench(RebalanceBench(str(skewed_checkpoint())), log)
        print(format_table(report["rebalance"], "rebalance: tiny --router-skew 1.2, 4 workers, static vs "
                                                "--redundant-experts 4 vs that plus --autoscale (max 6)"))
    if "failover" in sections:
        from .failover import FailoverBench, run_failover_bench

        report["failover"] = run_failover_bench(FailoverBench(tiny), log)
        print(format_table(report["failover"], "failover: tiny, 2 workers, 2 min per load row at 4 req/s, a random "
                                               "worker killed every 20 s through Ray"))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_dir, **report}, indent=2))
    return 0
