"""`expertmesh bench`: every README figure from one command (offline decode, distributed, serving)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SECTIONS = ("decode", "distributed", "serving")


def add_parser(sub) -> None:
    from cluster.cli import positive_int

    p = sub.add_parser("bench", help="benchmarks: in-process vs HF, workers vs in-process, serving vs HF")
    p.add_argument("--model", help="checkpoint dir (default: the `bench` preset in bf16, written once to the cache)")
    p.add_argument("--sections", default="decode,distributed,serving", help=f"comma-separated of {SECTIONS}")
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
    p.add_argument("--json", help="also write all rows to this JSON file")
    p.set_defaults(run=run)


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: values must be positive, got {text!r}")
    return values


def bench_model_dir() -> Path:
    from cluster.serve_cmd import cached_checkpoint

    return cached_checkpoint("bench", dtype="bfloat16")


def run(args) -> int:
    from model.loader import parse_dtype

    from .offline import DecodeBench, DistributedBench, format_table, run_decode_bench, run_distributed_bench
    from .serving import ServingBench, run_serving_bench

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"--sections: {unknown or sections} not in {SECTIONS}")
    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    for d in dtypes:
        parse_dtype(d)
    batches = int_list(args.batch_sizes, "--batch-sizes")
    workers = int_list(args.workers, "--workers")
    model_dir = str(Path(args.model) if args.model else bench_model_dir())
    repeats = {} if args.repeats is None else {"repeats": args.repeats}
    log = lambda row: print(row, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, list[dict]] = {}
    if "decode" in sections:
        report["decode"] = run_decode_bench(DecodeBench(model_dir, dtypes, batches, args.prompt_len, args.gen_len,
                                                        hf=not args.no_hf, **repeats), log)
        print(format_table(report["decode"], "in-process decode tokens/s (prefill included) vs HF transformers"))
    if "distributed" in sections:
        report["distributed"] = run_distributed_bench(
            DistributedBench(model_dir, workers, batches, "bfloat16", args.prompt_len, args.gen_len,
                             **repeats), log)
        print(format_table(report["distributed"], "bf16 decode through expert workers vs in-process"))
    if "serving" in sections:
        report["serving"] = run_serving_bench(ServingBench(model_dir, args.serving_workers,
                                                           num_prompts=args.num_prompts, hf=not args.no_hf), log)
        print(format_table(report["serving"], "serving: load test at max concurrency 32 vs HF static batches"))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_dir, **report}, indent=2))
    return 0
