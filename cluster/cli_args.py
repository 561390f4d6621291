"""argparse helpers shared by the `expertmesh` subcommands (a leaf module: it imports nothing from cluster)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from model.loader import DTYPES

DTYPE_CHOICES = sorted(DTYPES)


def _number(text: str, cast: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> float:
    """`cast(text)` if `ok` holds for it, else an ArgumentTypeError saying what was expected."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a finite number > 0")
