"""The distributed decode benchmark with the router and expert workers on one CUDA device, without Ray
(plain worker processes over gRPC), for a lent GPU machine: `python -m bench.gpu_check --model DIR`.

Prints tok/s in-process vs 2 and 4 workers at batch 1, 16, 64, and checks greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from cluster.placement import PlacementPlan
from model.generation import generate
from model.mixtral import Mixtral
from model.sampling import SamplingParams
from router.remote_experts import RemoteExperts, RoutingTable

from .offline import format_table, make_prompts


def start_workers(model_dir: str, plan: PlacementPlan, dtype: str, device: str) -> tuple[list, list[str]]:
    procs, addrs = [], []
    for w, experts in enumerate(plan.experts_of_worker):
        p = subprocess.Popen([sys.executable, "-m", "workers.standalone", "--model", model_dir, "--experts",
                              ",".join(map(str, experts)), "--dtype", dtype, "--device", device,
                              "--worker-id", f"w{w}"], stdout=subprocess.PIPE, text=True)
        procs.append(p)
    for p in procs:
        line = p.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"worker failed to start: {line!r}")
        addrs.append(f"127.0.0.1:{int(line.split()[1])}")
    return procs, addrs


def timed(model: Mixtral, prompts, gen_len: int) -> tuple[float, list[list[int]]]:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, _ = generate(model, prompts, SamplingParams(max_tokens=gen_len, ignore_eos=True))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", default="2,4")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--gen-len", type=int, default=32)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    local = Mixtral.from_pretrained(a.model, dtype=a.dtype, device=a.device)
    cfg = local.cfg
    rows, reference = [], {}
    timed(local, make_prompts(1, 16, cfg.vocab_size, 99), 2)
    for b in batches:
        timed(local, make_prompts(b, 16, cfg.vocab_size, 1), 4)  # warm-up: kernels for this shape
        s, out = timed(local, make_prompts(b, 16, cfg.vocab_size, 0), a.gen_len)
        reference[b] = (b * a.gen_len / s, out)
        rows.append({"config": "in-process", "batch": b, "tok_s": reference[b][0], "ratio": 1.0})
        print(rows[-1], flush=True)
    del local
    for n in [int(x) for x in a.workers.split(",")]:
        plan = PlacementPlan.build(cfg.num_hidden_layers, cfg.num_local_experts, n)
        procs, addrs = start_workers(a.model, plan, a.dtype, a.device)
        try:
            backend = RemoteExperts(RoutingTable.from_placement(plan.experts_of_worker, addrs, cfg.num_hidden_layers),
                                    cfg.num_local_experts)
            model = Mixtral.from_pretrained(a.model, dtype=a.dtype, device=a.device, experts=backend)
            timed(model, make_prompts(1, 16, cfg.vocab_size, 99), 2)
            for b in batches:
                before = (backend.stats.rpcs, backend.stats.wall_seconds, backend.stats.expert_seconds,
                          backend.stats.bytes_sent + backend.stats.bytes_received)
                timed(model, make_prompts(b, 16, cfg.vocab_size, 1), 4)
                before = (backend.stats.rpcs, backend.stats.wall_seconds, backend.stats.expert_seconds,
                          backend.stats.bytes_sent + backend.stats.bytes_received)
                s, out = timed(model, make_prompts(b, 16, cfg.vocab_size, 0), a.gen_len)
                st = backend.stats
                wall, expert = st.wall_seconds - before[1], st.expert_seconds - before[2]
                rows.append({"config": f"{n} workers", "batch": b, "tok_s": b * a.gen_len / s,
                             "ratio": b * a.gen_len / s / reference[b][0],
                             "rpcs_per_step": (st.rpcs - before[0]) / a.gen_len,
                             "kb_per_step": (st.bytes_sent + st.bytes_received - before[3]) / a.gen_len / 1024,
                             "router_s": s - wall, "wire_s": wall - expert, "expert_s": expert,
                             "same_tokens": out == reference[b][1]})
                print(rows[-1], flush=True)
            backend.close()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(format_table(rows, f"decode tok/s on {device}, {a.dtype}, router + workers on one device"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
