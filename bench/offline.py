"""Offline decode benchmarks (no HTTP): our in-process model vs HF transformers, and expert workers vs in-process.

Every figure is tokens generated / wall seconds of the whole generate call (prefill included), measured in
one run so ratios are fair on a shared, noisy machine. HF runs each of its experts implementations (eager,
grouped_mm, batched_mm where its per-token weight gather fits in memory) interleaved with ours; the fastest
is the baseline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from model.generation import generate
from model.grouped_experts import GroupedExperts
from model.kernel_choice import describe_cpu
from model.matmul import PreparedWeight
from model.mixtral import Mixtral
from model.sampling import SamplingParams

HF_EXPERTS = ("eager", "grouped_mm", "batched_mm")  # transformers 5 experts implementations that run on CPU
BATCHED_MM_GATHER_BYTES = 2 << 30  # batched_mm copies each token's expert weights: skipped above this


@dataclass(frozen=True)
class DecodeBench:
    model_dir: str
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    prompt_len: int = 16
    gen_len: int = 32
    hf: bool = True  # HF transformers generate on the same checkpoint, same run
    repeats: int = 2  # interleaved runs (ours, HF, ours, HF, ...); the best of each is reported
    seed: int = 0
    hf_experts: tuple[str, ...] = HF_EXPERTS
    device: str = "cpu"  # "cuda" on a GPU machine: ours and HF both there
    experts_impl: str = "auto"  # ours: see Mixtral.from_pretrained


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so wall time covers them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host CPU: {describe_cpu()}"
    return describe_cpu()


def make_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1000 + batch)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=g).tolist()


def time_ours(model: Mixtral, prompts: list[list[int]], gen_len: int) -> float:
    synchronize(model.device)
    t0 = time.perf_counter()
    out, _ = generate(model, prompts, SamplingParams(max_tokens=gen_len, ignore_eos=True))
    synchronize(model.device)
    seconds = time.perf_counter() - t0
    assert all(len(o) == gen_len for o in out)
    return seconds


def time_hf(hf_model, prompts: list[list[int]], gen_len: int) -> float:
    ids = torch.tensor(prompts, device=hf_model.device)
    with torch.inference_mode():
        synchronize(hf_model.device)
        t0 = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                                min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
        synchronize(hf_model.device)
        seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + gen_len
    return seconds


def load_hf(model_dir: str, dtype: str, device: str = "cpu"):
    import transformers

    model = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def hf_experts_for(cfg: DecodeBench, model_cfg, batch: int, itemsize: int) -> list[str]:
    """The HF experts implementations to time at `batch`: batched_mm only where its weight gather for the
    prefill (every (token, slot) pair's expert weights at once) stays under BATCHED_MM_GATHER_BYTES."""
    pairs = batch * cfg.prompt_len * model_cfg.num_experts_per_tok
    gather = pairs * 3 * model_cfg.intermediate_size * model_cfg.hidden_size * itemsize
    return [e for e in cfg.hf_experts if e != "batched_mm" or gather <= BATCHED_MM_GATHER_BYTES]


def kernel_plans(model: Mixtral) -> dict[str, str]:
    """The kernel plan of each kind of weight in `model` (one layer's; all layers share the shapes); for stacked
    experts, how they run."""
    plans = {}
    if isinstance(model.experts, GroupedExperts):
        plans["experts"] = f"stacked, {model.experts.mode} (one grouped product per weight, no host sync)"
    named = {"attention qkv": model.layers[0].wqkv, "attention out": model.layers[0].wo, "lm_head": model.lm_head}
    experts = getattr(model.experts, "experts", None)
    if experts:
        named |= {"expert w1+w3": experts[0][0].w13, "expert w2": experts[0][0].w2}
    return plans | {name: w.plan.describe() for name, w in named.items() if isinstance(w, PreparedWeight)}


def run_decode_bench(cfg: DecodeBench, log=print) -> dict:
    """{"cpu", "threads", "kernels": {dtype: {weight: plan}}, "rows": [{dtype, batch, ours_tok_s, hf_tok_s,
    hf_experts, ratio}]}; warm-up runs are not timed. "cpu" names the GPU too where cfg.device is one."""
    rows, kernels = [], {}
    for dtype in cfg.dtypes:
        ours = Mixtral.from_pretrained(cfg.model_dir, dtype=dtype, device=cfg.device, experts_impl=cfg.experts_impl)
        kernels[dtype] = kernel_plans(ours)
        for name, plan in kernels[dtype].items():
            log(f"kernels {name}: {plan}")
        hf = load_hf(cfg.model_dir, dtype, cfg.device) if cfg.hf else None
        warm = make_prompts(1, cfg.prompt_len, ours.cfg.vocab_size, cfg.seed + 99)
        time_ours(ours, warm, 2)
        itemsize = torch.empty((), dtype=ours.dtype).element_size()
        for batch in cfg.batch_sizes:
            prompts = make_prompts(batch, cfg.prompt_len, ours.cfg.vocab_size, cfg.seed)
            tokens = batch * cfg.gen_len
            impls = hf_experts_for(cfg, ours.cfg, batch, itemsize) if hf is not None else []
            for impl in impls:  # warm-up
                hf.set_experts_implementation(impl)
                time_hf(hf, warm, 2)
            ours_s, hf_s = [], {impl: [] for impl in impls}
            for _ in range(cfg.repeats):  # interleaved, so all see the same machine load
                ours_s.append(time_ours(ours, prompts, cfg.gen_len))
                for impl in impls:
                    hf.set_experts_implementation(impl)
                    hf_s[impl].append(time_hf(hf, prompts, cfg.gen_len))
            row = {"dtype": dtype, "batch": batch, "ours_tok_s": tokens / min(ours_s)}
            if impls:
                best = min(impls, key=lambda i: min(hf_s[i]))
                row |= {"hf_tok_s": tokens / min(hf_s[best]), "hf_experts": best}
                row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
                log(format_row(row) + "  (HF tok/s: " + ", ".join(
                    f"{i} {tokens / min(hf_s[i]):.2f}" for i in impls) + ")")
            else:
                log(format_row(row))
            rows.append(row)
        del ours, hf
    return {"cpu": describe_device(torch.device(cfg.device)), "threads": torch.get_num_threads(),
            "kernels": kernels, "rows": rows}


def format_kernels(report: dict) -> str:
    """The decode report's machine and kernel plans, as lines for the console and the README."""
    lines = [f"CPU: {report['cpu']}; torch {torch.__version__}, {report['threads']} threads; kernel per row count:"]
    for plans in report["kernels"].values():
        lines += [f"  {name}: {plan}" for name, plan in plans.items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class DistributedBench:
    model_dir: str
    workers: tuple[int, ...] = (2, 4)
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    dtype: str = "bfloat16"
    prompt_len: int = 16
    gen_len: int = 32
    router_cpus: int = 2  # torch threads of the router (and of the in-process baseline)
    worker_cpus: int = 1  # torch threads per expert worker
    overlap: tuple[bool, ...] = (False, True)  # rows without and with micro-batch overlap (ping-pong)
    repeats: int = 3  # interleaved pairs (in-process, distributed); the best of each is reported
    seed: int = 0


def run_distributed_bench(cfg: DistributedBench, log=print) -> list[dict]:
    """Rows per (config, batch): tok/s, ratio to in-process, RPCs and bytes per step, time split.

    While each cluster is up, in-process and distributed runs alternate, so every ratio compares runs made
    under the same machine load: `ratio` is the best distributed run over the best in-process run
    (`in_process_tok_s`) of that window, `ratio_median` the median over the back-to-back pairs (it shows how
    much a noisy machine moved the ratio)."""
    import ray

    from cluster.deployment import ClusterConfig, ExpertCluster

    torch.set_num_threads(cfg.router_cpus)
    local = Mixtral.from_pretrained(cfg.model_dir, dtype=cfg.dtype)
    vocab = local.cfg.vocab_size
    warm = make_prompts(1, cfg.prompt_len, vocab, 99)
    time_ours(local, warm, 2)
    baseline: dict[int, float] = {}  # best in-process tok/s per batch over all runs
    rows = []
    steps = cfg.gen_len  # one prefill step + gen_len - 1 decode steps
    for n in cfg.workers:
        cluster_cfg = ClusterConfig(cfg.model_dir, n, cfg.dtype, router_cpus=cfg.router_cpus,
                                    worker_cpus=cfg.worker_cpus)
        with ExpertCluster(cluster_cfg) as cluster:
            router = cluster.router
            ray.get(router.generate.remote(warm, SamplingParams(max_tokens=2, ignore_eos=True)))
            for batch in cfg.batch_sizes:
                prompts = make_prompts(batch, cfg.prompt_len, vocab, cfg.seed)
                tokens = batch * cfg.gen_len
                modes = [o for o in cfg.overlap if not o or batch > 1]  # one sequence has nothing to split
                local_s, runs = [], {o: [] for o in modes}
                for _ in range(cfg.repeats):
                    local_s.append(time_ours(local, prompts, cfg.gen_len))
                    for o in modes:
                        runs[o].append(_time_distributed(ray, router, prompts, cfg.gen_len, o))
                local_tok_s = tokens / min(local_s)
                baseline[batch] = max(baseline.get(batch, 0.0), local_tok_s)
                for o in modes:
                    seconds, d = min(runs[o], key=lambda r: r[0])
                    tok_s = tokens / seconds
                    pair_ratios = [ls / rs for ls, (rs, _) in zip(local_s, runs[o], strict=True)]
                    row = {"config": f"{n} workers" + (", overlap" if o else ""), "batch": batch, "tok_s": tok_s,
                           "ratio": tok_s / local_tok_s, "ratio_median": statistics.median(pair_ratios),
                           "in_process_tok_s": local_tok_s, "rpcs_per_step": d["rpcs"] / steps,
                           "decode_kb_per_step": (d["bytes_sent"] + d["bytes_received"]) / steps / 1024,
                           "router_s": seconds - d["wall_seconds"],
                           "wire_s": d["wall_seconds"] - d["expert_seconds"], "expert_s": d["expert_seconds"]}
                    if o:  # the halves' dispatches overlap each other and the router: no wall-clock split
                        row["router_s"] = row["wire_s"] = None
                    log(format_row(row))
                    rows.append(row)
    del local
    return [{"config": "in-process", "batch": b, "tok_s": v, "ratio": 1.0} for b, v in baseline.items()] + rows


def _time_distributed(ray, router, prompts: list[list[int]], gen_len: int, overlap: bool) -> tuple[float, dict]:
    """Seconds of one generate call through the router actor, and the dispatch counters it added."""
    before = ray.get(router.dispatch_stats.remote())
    t0 = time.perf_counter()
    ray.get(router.generate.remote(prompts, SamplingParams(max_tokens=gen_len, ignore_eos=True), overlap=overlap))
    seconds = time.perf_counter() - t0
    after = ray.get(router.dispatch_stats.remote())
    keys = ("rpcs", "bytes_sent", "bytes_received", "wall_seconds", "expert_seconds")
    return seconds, {k: after[k] - before[k] for k in keys}


def format_row(row: dict) -> str:
    return "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def format_table(rows: list[dict], title: str) -> str:
    """A plain-text table; columns are the union of the rows' keys in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
