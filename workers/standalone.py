"""Run one expert worker as a plain process (no Ray): `python -m workers.standalone --model DIR --experts 0,1`.

Prints `PORT <n>` once serving; SIGTERM/SIGINT stops it gracefully. Its Prometheus metrics are on
--metrics-port (default: any free port; the Info RPC's metrics_url says which).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from model.config import MixtralConfig

from .expert_worker import ExpertWorker
from .metrics import start_metrics_server
from .servicer import serve_worker


async def _serve(args) -> None:
    cfg = MixtralConfig.from_file(args.model)
    experts = [int(e) for e in args.experts.split(",")]
    pairs = [(layer, e) for layer in range(cfg.num_hidden_layers) for e in experts]
    worker = ExpertWorker(args.model, pairs, dtype=args.dtype, device=args.device, worker_id=args.worker_id)
    metrics, metrics_port = start_metrics_server(worker, args.host, args.metrics_port)
    metrics_url = f"http://{args.host}:{metrics_port}/metrics"
    server, port = await serve_worker(worker, args.host, args.port, metrics_url=metrics_url)
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)
    metrics.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m workers.standalone", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--experts", required=True, help="comma-separated expert ids, hosted in every layer")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--worker-id", default="w0")
    p.add_argument("--metrics-port", type=int, default=0)
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
