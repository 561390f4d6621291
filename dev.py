#!/usr/bin/env python3
"""Set up everything and run expertmesh, its tests or its benchmarks, on a machine with only python3.

    python3 dev.py serve [serve flags]   # venv + install, then `expertmesh serve` (embedded Ray, tiny model)
    python3 dev.py test [pytest args]    # venv + install (+ Prometheus for the metrics test), ruff, pytest
    python3 dev.py run CMD [args]        # any `expertmesh` subcommand (bench, loadtest, generate, ...)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; a looser pin pulls a multi-GB CUDA build


def sh(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def ensure_venv() -> None:
    if not PY.exists():
        sh(sys.executable, "-m", "venv", str(VENV))
    stamp = VENV / ".expertmesh-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    sh(str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip")
    sh(str(PY), "-m", "pip", "install", "-q", TORCH)
    sh(str(PY), "-m", "pip", "install", "-q", "-e", ".[dev]")
    stamp.write_text(want)


def ensure_iproute2() -> None:
    """iproute2's `ip` for the two-node network-namespace test (best effort as ensure_prometheus; it skips without)."""
    if shutil.which("ip") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        sh("apt-get", "update", "-qq", env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", "iproute2", env=env)
    except subprocess.CalledProcessError as e:
        print(f"could not install iproute2 ({e}); the network-namespace test will skip", file=sys.stderr)


def ensure_prometheus() -> None:
    """Debian's prometheus server for the metrics integration test (best effort: that test skips without it)."""
    if shutil.which("prometheus") or Path("/usr/bin/prometheus").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("prometheus not installed and cannot apt-get it here; its test will skip", file=sys.stderr)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        sh("apt-get", "update", "-qq", env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus", env=env)
    except subprocess.CalledProcessError as e:
        print(f"could not install prometheus ({e}); its test will skip", file=sys.stderr)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "run"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if argv[0] == "test":
        ensure_prometheus()
        ensure_iproute2()
        lint = subprocess.run([str(VENV / "bin" / "ruff"), "check", "."], cwd=ROOT, env=env)
        if lint.returncode != 0:  # lint is part of the test: a lint failure fails the run before pytest
            print("ruff check . failed; fix the findings above (tests not run)", file=sys.stderr)
            return lint.returncode
        cmd = [str(PY), "-m", "pytest", *argv[1:]]
    elif argv[0] == "serve":
        cmd = [str(VENV / "bin" / "expertmesh"), "serve", *argv[1:]]
    else:
        cmd = [str(VENV / "bin" / "expertmesh"), *argv[1:]]
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
