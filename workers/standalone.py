"""Run one expert worker as a plain process (no Ray): `python -m workers.standalone --model DIR --experts 0,1`.

Prints `PORT <n>` once serving; SIGTERM/SIGINT stops it gracefully. Its Prometheus metrics are on
--metrics-port (default: any free port; the Info RPC's metrics_url says which). ExpertService calls need the
secret in $EXPERTMESH_GRPC_SECRET or --secret-file (never a flag value: argv shows in `ps`), when one is given;
--tls-cert/--tls-key (and --tls-ca for mutual TLS) serve TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from model.config import MixtralConfig
from protos.addresses import advertised_host
from protos.security import SECRET_ENV, DataPlaneSecurity

from .expert_worker import ExpertWorker
from .metrics import start_metrics_server
from .servicer import serve_worker


async def _serve(args) -> None:
    cfg = MixtralConfig.from_file(args.model)
    experts = [int(e) for e in args.experts.split(",")]
    pairs = [(layer, e) for layer in range(cfg.num_hidden_layers) for e in experts]
    worker = ExpertWorker(args.model, pairs, dtype=args.dtype, device=args.device, worker_id=args.worker_id)
    metrics, metrics_port = start_metrics_server(worker, args.host, args.metrics_port)
    metrics_url = f"http://{advertised_host(args.host)}:{metrics_port}/metrics"
    server, port = await serve_worker(worker, args.host, args.port, metrics_url=metrics_url,
                                      security=security_from(args))
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)
    metrics.shutdown()


def security_from(args) -> DataPlaneSecurity | None:
    """The secret from --secret-file or $EXPERTMESH_GRPC_SECRET (None: no secret, plaintext unless TLS)."""
    secret = os.environ.get(SECRET_ENV, "")
    if args.secret_file:
        try:
            secret = Path(args.secret_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"--secret-file: cannot read {args.secret_file}: {e.strerror}") from None
    if not secret and not args.tls_cert:
        return None
    if not secret:
        raise SystemExit(f"--tls-cert: TLS needs a secret too (${SECRET_ENV} or --secret-file)")
    tls = DataPlaneSecurity.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    return DataPlaneSecurity(secret, tls.tls_cert, tls.tls_key, tls.tls_ca)


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
    p.add_argument("--secret-file", help=f"file holding the data-plane secret (else ${SECRET_ENV})")
    p.add_argument("--tls-cert", help="PEM certificate to serve TLS with")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA: require client certificates signed by it (mutual TLS)")
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
