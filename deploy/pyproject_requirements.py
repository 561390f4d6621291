"""Print pyproject.toml's pinned requirements for deploy/Dockerfile, which installs them before the source.

`torch`: the torch pin alone (installed from the wheel index of the image variant); `rest`: every other runtime
dependency plus the `cluster` extra (ray[default], the dashboard agent KubeRay needs), one per line.
"""

from __future__ import annotations

import re
import sys

import tomllib


def requirements(pyproject: str, which: str) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["cluster"]
    is_torch = [re.match(r"[A-Za-z0-9_.-]+", r).group() == "torch" for r in reqs]
    if which == "torch":
        return [r for r, t in zip(reqs, is_torch, strict=True) if t]
    if which == "rest":
        return [r for r, t in zip(reqs, is_torch, strict=True) if not t]
    raise SystemExit(f"usage: pyproject_requirements.py PYPROJECT torch|rest (got {which!r})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: pyproject_requirements.py PYPROJECT torch|rest")
    print("\n".join(requirements(sys.argv[1], sys.argv[2])))
