"""Prometheus file_sd: the JSON target list Prometheus watches (file_sd_configs), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

ROUTER_JOB, WORKER_JOB = "expertmesh-router", "expertmesh-worker"


def target_of(url: str) -> str:
    """"http://host:port/metrics" -> "host:port"."""
    return urlsplit(url).netloc


def file_sd_groups(router_metrics_url: str | None, workers: list[tuple[str, str]]) -> list[dict]:
    """One target group for the router (when it serves metrics) and one per (worker id, metrics url)."""
    groups = []
    if router_metrics_url:
        groups.append({"targets": [target_of(router_metrics_url)], "labels": {"job": ROUTER_JOB}})
    for worker_id, url in workers:
        groups.append({"targets": [target_of(url)], "labels": {"job": WORKER_JOB, "worker": worker_id}})
    return groups


def write_file_sd(path: str | Path, groups: list[dict]) -> bool:
    """Write the groups to path (temp file + rename, so Prometheus never reads half a file).

    False, and nothing written, when the file already holds exactly these groups.
    """
    path = Path(path)
    text = json.dumps(groups, indent=2) + "\n"
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
