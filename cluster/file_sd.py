"""Prometheus file_sd: the JSON target list Prometheus watches (file_sd_configs), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from router.service_discovery import ROUTER_JOB, WORKER_JOB, target_of
from router.service_discovery import target_groups as file_sd_groups  # the same groups as the router's http_sd

__all__ = ["ROUTER_JOB", "WORKER_JOB", "file_sd_groups", "target_of", "write_file_sd"]


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
