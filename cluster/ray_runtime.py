"""Ray bring-up: an embedded local Ray sized to this machine by default, or join a cluster with --address."""

from __future__ import annotations

import os
import re

import ray

AUTH_PROBE_TIMEOUT_S = 10.0
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d+$")


class RayAuthError(PermissionError):
    """The cluster refused us: one line naming RAY_AUTH_MODE / RAY_AUTH_TOKEN (the CLI prints it, no traceback)."""


def start_ray(address: str | None = None, num_cpus: int | None = None, num_cpus_needed: int = 2) -> dict:
    """Connect to (or start) Ray; returns the cluster's total resources.

    Embedded mode declares at least the logical CPUs the actors ask for (plus one for the driver), so small
    machines can host every actor (torch threads per actor follow each actor's CPU share, not the declared total).
    Joining a cluster that wants a token we lack raises RayAuthError at once (Ray itself retries for ~20 s,
    then says only "Failed to connect").
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    env = {"env_vars": {"RAY_DEDUP_LOGS": "0"}}
    if address:
        check_ray_auth(address)
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except ray.exceptions.AuthenticationError:
            raise RayAuthError(_auth_message(address, token_found=False)) from None
    else:
        cpus = num_cpus or max(os.cpu_count() or 1, num_cpus_needed + 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
                 _system_config={"metrics_report_interval_ms": 60000})
    return ray.cluster_resources()


def check_ray_auth(address: str, timeout_s: float = AUTH_PROBE_TIMEOUT_S) -> None:
    """Ask the GCS at `address` (host:port) for its cluster id with the token Ray would send; RayAuthError when
    it answers UNAUTHENTICATED. Anything else (unreachable, another address form) is left to ray.init."""
    if not _HOST_PORT.match(address):
        return
    import grpc

    try:  # Ray's own token, as its client would attach it (none unless RAY_AUTH_MODE=token)
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple,
        )
        metadata = _get_authentication_metadata_tuple()
    except Exception:  # noqa: BLE001 - a Ray without token auth, or no token: probe without one
        metadata = ()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise RayAuthError(_auth_message(address, token_found=bool(metadata))) from None


def _auth_message(address: str, token_found: bool) -> str:
    where = "put the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head)"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token and {where}"
    if token_found:
        return f"the Ray cluster at {address} rejected this token (RAY_AUTH_MODE=token): {where}"
    return f"the Ray cluster at {address} requires a token and none was found (RAY_AUTH_MODE=token): {where}"


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def stop_ray() -> None:
    """Disconnect, and stop the embedded Ray's processes; also after a ray.init that was interrupted part way
    (ray.is_initialized() is then False, but the GCS and raylet may be up)."""
    ray.shutdown()
