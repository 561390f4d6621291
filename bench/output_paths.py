"""Checks on the files a bench command will write, made before it runs (not after minutes of work)."""

from __future__ import annotations

import os


def check_output_paths(result_file: str | None, plot: str | None) -> None:
    """ValueError naming the flag when the directory of --result-file or --plot does not exist."""
    for flag, path in (("--result-file", result_file), ("--plot", plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the directory of {path!r} does not exist")
