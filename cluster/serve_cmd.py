"""`expertmesh serve`: embedded Ray (or --address), expert workers, the router with the OpenAI API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .cli_args import DTYPE_CHOICES, positive_float, positive_int
from .rebalance_flags import add_flags as add_rebalance_flags
from .rebalance_flags import attach as attach_rebalancer
from .rebalance_flags import settings_from_args as rebalance_settings
from .serve_lifecycle import EXIT_GRACE_S, PARENT_PID_ENV, ServeLifecycle, exit_after, force_exit, kill_session, say
from .serve_secrets import add_flags, child_argv_env, curl_auth_hint, data_plane_security, resolve_api_key

DEFAULT_PRESET = "tiny"
FILE_SD_REFRESH_S = 10.0
# Where deploy/prometheus/prometheus.yml looks (a fixed path, as Ray's /tmp/ray/prom_metrics_service_discovery.json)
DEFAULT_FILE_SD = Path("/tmp/expertmesh/file_sd.json")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible API")
    p.add_argument("--model", help="checkpoint directory (default: a tiny random checkpoint, written once)")
    p.add_argument("--workers", type=positive_int, default=2, help="expert worker actors")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP bind address (0.0.0.0: all interfaces; the URL printed then has this node's IP)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    add_flags(p)  # --api-key(-file), --metrics-auth, --bind-host, --grpc-tls-*
    p.add_argument("--served-model-name")
    p.add_argument("--placement", choices=["contiguous", "round-robin"], default="contiguous")
    p.add_argument("--pg-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default="PACK")
    p.add_argument("--router-resource", metavar="NAME",
                   help="custom Ray resource the router takes 1 of, to pin it (and the HTTP port) to the node "
                        "offering it, e.g. a KubeRay head started with resources {\"expertmesh_router\": 1}")
    p.add_argument("--kv-cache-mb", type=positive_int, default=512, help="KV cache budget")
    p.add_argument("--max-num-seqs", type=positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="per-step token budget")
    p.add_argument("--max-waiting", type=positive_int, default=256, help="waiting queue bound (429 beyond)")
    p.add_argument("--max-model-len", type=positive_int)
    p.add_argument("--queue-timeout", type=positive_float, metavar="S",
                   help="a request not scheduled within S seconds gets a 503 (default: wait as long as it takes)")
    p.add_argument("--request-timeout", type=positive_float, metavar="S",
                   help="a request not finished S seconds after arrival fails with 503 (default: no deadline; a "
                        "request waits out any expert worker recovery)")
    p.add_argument("--overlap", choices=("off", "on", "auto"), default="off",
                   help="run each step of 2+ sequences as two micro-batches: the router computes one's attention "
                        "while the expert workers run the other's experts; auto: per kind and size of step, time "
                        "both ways and keep the faster (default off: slower on machines where the router and "
                        "workers share cores; `expertmesh bench --sections distributed` measures both)")
    p.add_argument("--dispatch-timeout", type=positive_float, default=10.0, metavar="S",
                   help="deadline of one expert Dispatch RPC; a worker that misses it is treated as dead and "
                        "replaced (default 10)")
    p.add_argument("--replace-timeout", type=positive_float, default=60.0, metavar="S",
                   help="seconds a replacement worker may wait for a node with capacity before requests held "
                        "for it fail (default 60)")
    p.add_argument("--max-request-bytes", type=positive_int, default=4 * 1024 * 1024,
                   help="request body limit in bytes (413 beyond)")
    p.add_argument("--max-concurrent-requests", type=positive_int, default=1024,
                   help="HTTP requests in flight at most, streams included (503 + Retry-After beyond)")
    p.add_argument("--prometheus-file-sd", metavar="PATH",
                   help="Prometheus file_sd JSON listing the router and worker metrics targets "
                        f"(default: {DEFAULT_FILE_SD}, where deploy/prometheus/prometheus.yml looks)")
    p.add_argument("--no-expert-metrics", action="store_true",
                   help="drop the per-(layer, expert) metric series (for models with very many experts)")
    add_rebalance_flags(p)  # --redundant-experts, --target-imbalance, --rebalance-interval, --autoscale, ...
    p.set_defaults(run=run)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertmesh"


def cached_checkpoint(preset: str = DEFAULT_PRESET, dtype: str = "float32") -> Path:
    """A random checkpoint of `preset` in the user's cache, written on first use (atomically)."""
    from model.random_checkpoint import write_checkpoint

    target = cache_dir() / (f"{preset}-seed0" if dtype == "float32" else f"{preset}-{dtype}-seed0")
    if not (target / "config.json").exists():
        tmp = cache_dir() / f".{target.name}-{os.getpid()}"
        print(f"writing a {preset} random checkpoint to {target} (first run only)", file=sys.stderr)
        write_checkpoint(tmp, preset, seed=0, dtype=dtype)
        tmp.rename(target)
    return target


CHILD_ENV = "EXPERTMESH_SERVE_CHILD"
def run(args) -> int:
    """Run the server in a child process in its own session, so a terminal's Ctrl-C reaches only us (not
    Ray's raylet and GCS, which would die mid-drain). The first SIGINT/SIGTERM is forwarded to the child as
    SIGTERM (drain); a second one SIGKILLs the child's session (it and its Ray) and we exit 130. The child
    stops (drains) by itself when we die, even by SIGKILL."""
    if os.environ.get(CHILD_ENV):
        parent = os.environ.get(PARENT_PID_ENV)
        rc = 1
        try:
            rc = serve(args, ServeLifecycle(int(parent) if parent else os.getppid()))
            return rc
        finally:  # then exiting the interpreter is bounded too
            threading.Thread(target=exit_after, args=(EXIT_GRACE_S, rc), name="exit-watchdog", daemon=True).start()
    child: subprocess.Popen | None = None
    signals = forwarded = 0

    def forward() -> None:  # each signal once, in order, however the handler and the main thread interleave
        nonlocal forwarded
        while child is not None and forwarded < signals:
            forwarded += 1
            if forwarded == 1:
                say("draining... press Ctrl-C again to force exit")
                child.send_signal(signal.SIGTERM)
            else:
                say("forcing exit")
                kill_session(child.pid)

    def on_signal(_signum, _frame) -> None:
        nonlocal signals
        signals += 1
        forward()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # Ray's own SIGTERM handler (in place while ray.init runs in the child) would otherwise wait up to 30 s for a
    # node drain meant for Ray Serve; we drain ourselves.
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ, CHILD_ENV: "1",
           PARENT_PID_ENV: str(os.getpid())}
    argv, env, fds = child_argv_env(args.argv, env)  # an --api-key goes by a pipe, never argv (`ps` shows it)
    child = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], start_new_session=True, env=env,
                             pass_fds=fds)
    for fd in fds:
        os.close(fd)
    forward()  # a signal that came before the child existed
    rc = child.wait()
    if signals >= 2:
        kill_session(child.pid)  # whatever of it outlived the child
        return 130
    return rc if rc >= 0 else 128 - rc


def serve(args, life: ServeLifecycle | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or the parent's death); startup checks for a stop between its phases (Ray,
    workers and router, HTTP server) and cleans up what it started."""
    life = life or ServeLifecycle()
    life.start()  # first thing: a signal during the (slow) imports and startup must stop us too
    try:
        return _serve(args, life)
    except KeyboardInterrupt:  # StartupAborted (ray.get passes it on as a plain KeyboardInterrupt)
        say("expertmesh serve: startup aborted")
        # Not ray.shutdown(): after a signal that interrupted ray.init it can abort the process (SIGABRT, seen
        # in CI-like runs). Killing our session stops the embedded Ray; a cluster's GCS drops our actors.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        force_exit(130)
    finally:
        if "cluster.ray_runtime" in sys.modules:  # else Ray was never imported, let alone started
            from .ray_runtime import stop_ray

            stop_ray()


def _serve(args, life: ServeLifecycle) -> int:
    from router.api import ApiLimits
    from router.metrics import MetricsConfig
    from router.scheduler import EngineConfig
    from router.server import ServerConfig

    from .ray_runtime import start_ray

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: {args.port} is not a TCP port")
    model_dir = str(Path(args.model) if args.model else cached_checkpoint())
    engine = EngineConfig(kv_cache_bytes=args.kv_cache_mb * 1024 * 1024, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
                          max_model_len=args.max_model_len, queue_timeout_s=args.queue_timeout,
                          request_timeout_s=args.request_timeout, overlap=args.overlap)
    security = data_plane_security(args)  # reads the --grpc-tls-* files: fail before starting anything
    from model.config import MixtralConfig
    placing = rebalance_settings(args, MixtralConfig.from_file(model_dir).num_local_experts)
    server = ServerConfig(host=args.host, port=args.port, api_key=resolve_api_key(args), metrics_auth=args.metrics_auth,
                          served_model_name=args.served_model_name, engine=engine,
                          metrics=MetricsConfig(expert_metrics=not args.no_expert_metrics),
                          limits=ApiLimits(max_request_bytes=args.max_request_bytes,
                                           max_concurrent_requests=args.max_concurrent_requests))
    life.check()
    try:
        most = placing.autoscale.max_workers if placing.autoscale else args.workers  # embedded Ray: room for all
        with life.keeping_handlers():  # ray.init's own SIGTERM handler would abort us mid-connect
            start_ray(args.address, num_cpus_needed=most + 1)
    except SystemExit:  # from Ray's SIGTERM handler (a Ray whose handlers could not be kept out)
        life.signalled_in_ray_init()
        raise
    finally:
        life.install_handlers()
    life.check()
    return _serve_cluster(args, model_dir, server, life, security, placing)


def _serve_cluster(args, model_dir: str, server, life: ServeLifecycle, security=None, placing=None) -> int:
    import ray

    from .controller import Controller, ControllerConfig
    from .deployment import ClusterConfig, ExpertCluster

    with ExpertCluster(ClusterConfig(model_dir, args.workers, args.dtype, args.placement, args.pg_strategy,
                                     address=args.address, expert_metrics=not args.no_expert_metrics,
                                     router_resource=args.router_resource,
                                     dispatch_timeout_s=args.dispatch_timeout,
                                     replace_timeout_s=args.replace_timeout,
                                     bind_host=args.bind_host, security=security,
                                     redundant_experts=args.redundant_experts)) as cluster:
        life.check()
        url = ray.get(cluster.router.start_server.remote(server))
        controller = Controller(cluster, ControllerConfig(hung_after_s=args.dispatch_timeout),
                                start_server=lambda router: ray.get(router.start_server.remote(server))).start()
        if placing is not None:  # rebalance / autoscale on the controller's ticks
            attach_rebalancer(controller, cluster, placing)
        file_sd = Path(args.prometheus_file_sd) if args.prometheus_file_sd else DEFAULT_FILE_SD
        try:
            cluster.write_file_sd(file_sd)
        except OSError as e:  # e.g. another user's /tmp/expertmesh: serve on, without the file
            say(f"cannot write the Prometheus file_sd file {file_sd} ({e}); choose one with --prometheus-file-sd")
            cluster.file_sd_path = None
        life.serving()
        name = args.served_model_name or Path(model_dir).name
        auth = curl_auth_hint(args) if server.api_key else ""
        print(f"expertmesh serving {model_dir} with {args.workers} expert workers at {url}", flush=True)
        print(f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        print(f"metrics: {url}/metrics   health: {url}/health   stop: Ctrl-C", flush=True)
        print(f"ray: {ray.get_runtime_context().gcs_address} (for loadtest --ray-address)", flush=True)
        if cluster.file_sd_path is not None:
            print(f"prometheus file_sd targets: {file_sd} (see deploy/prometheus/prometheus.yml)", flush=True)
        next_refresh = time.monotonic() + FILE_SD_REFRESH_S
        while not life.wait(0.5):
            if time.monotonic() >= next_refresh:  # a restarted worker has a new metrics port
                next_refresh = time.monotonic() + FILE_SD_REFRESH_S
                try:
                    cluster.refresh_file_sd()
                except Exception as e:  # noqa: BLE001 - keep serving; retry next round
                    say(f"file_sd refresh failed: {e}")
        say("draining in-flight requests and shutting down...")
        controller.stop()
        ray.get(cluster.router.stop_server.remote())
    say("stopped")
    return 0
