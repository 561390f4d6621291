"""Ray bring-up: an embedded local Ray sized to this machine by default, or join a cluster with --address."""

from __future__ import annotations

import os

import ray


def start_ray(address: str | None = None, num_cpus: int | None = None, num_cpus_needed: int = 2) -> dict:
    """Connect to (or start) Ray; returns the cluster's total resources.

    Embedded mode declares at least the logical CPUs the actors ask for (plus one for the driver), so small
    machines can host every actor (torch threads per actor follow each actor's CPU share, not the declared total).
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    env = {"env_vars": {"RAY_DEDUP_LOGS": "0"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        cpus = num_cpus or max(os.cpu_count() or 1, num_cpus_needed + 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
                 _system_config={"metrics_report_interval_ms": 60000})
    return ray.cluster_resources()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def stop_ray() -> None:
    """Disconnect, and stop the embedded Ray's processes; also after a ray.init that was interrupted part way
    (ray.is_initialized() is then False, but the GCS and raylet may be up)."""
    ray.shutdown()
