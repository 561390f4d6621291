"""Whether a step runs as two overlapped micro-batches (`--overlap on|off|auto`); `auto` measures.

auto: steps are grouped by kind (decode only, or with prefill chunks) and sequence count (2-3, 4-7, 8-15, ...).
In each group the first PROBE_STEPS eligible steps per mode alternate between one batch and two overlapped
halves; then the mode with the lower median seconds per new token runs (the halves only when at least MARGIN
faster), until REPROBE_AFTER more steps of that group, when it probes again (load, batch shapes and expert
placement change). The two modes agree on tokens and logits to float rounding, so switching is safe.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
MODES = ("off", "on", "auto")
PROBE_STEPS = 6  # timed steps per mode before a group's choice
MARGIN = 0.03  # the halves must be this much faster per token to be chosen
REPROBE_AFTER = 2000  # steps of a group between probes


@dataclass
class _Group:
    samples: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    choice: bool | None = None  # None while probing
    since: int = 0  # steps run on the choice


class OverlapChooser:
    """Per step: split it (`split`), then report how long it took (`record`). Not thread-safe: the engine
    calls it from its step loop only."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"overlap: {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self._groups: dict[tuple[bool, int], _Group] = {}

    @staticmethod
    def _key(num_seqs: int, has_prefill: bool) -> tuple[bool, int]:
        return has_prefill, num_seqs.bit_length()  # 2-3 -> 2, 4-7 -> 3, ...

    def split(self, num_seqs: int, has_prefill: bool) -> bool:
        if num_seqs < 2 or self.mode == "off":
            return False
        if self.mode == "on":
            return True
        key = self._key(num_seqs, has_prefill)
        g = self._groups.setdefault(key, _Group())
        if g.choice is not None:
            g.since += 1
            if g.since <= REPROBE_AFTER:
                return g.choice
            g = self._groups[key] = _Group()  # probe again
        return len(g.samples[True]) < len(g.samples[False])  # probing: the mode with fewer samples, whole first

    def record(self, num_seqs: int, has_prefill: bool, split: bool, seconds: float, tokens: int) -> None:
        if self.mode != "auto" or num_seqs < 2 or tokens < 1:
            return
        key = self._key(num_seqs, has_prefill)
        g = self._groups.setdefault(key, _Group())
        if g.choice is not None:
            return
        g.samples[split].append(seconds / tokens)
        if min(len(v) for v in g.samples.values()) >= PROBE_STEPS:
            whole, halves = (statistics.median(g.samples[m]) for m in (False, True))
            g.choice = halves < whole * (1 - MARGIN)
            log.info("overlap for %s steps of %s sequences: %s (%.3g vs %.3g ms per token)",
                     "prefill" if has_prefill else "decode", self._label(key[1]), "on" if g.choice else "off",
                     halves * 1e3, whole * 1e3)

    @staticmethod
    def _label(bits: int) -> str:
        return f"{1 << (bits - 1)}-{(1 << bits) - 1}"

    def choices(self) -> dict[str, str]:
        """{"decode 4-7": "on" | "off" | "probing", ...} for the groups seen so far."""
        return {f"{'prefill' if p else 'decode'} {self._label(b)}": "probing" if g.choice is None else
                "on" if g.choice else "off" for (p, b), g in sorted(self._groups.items())}
