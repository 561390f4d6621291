"""Scrape a /metrics endpoint with prometheus-client's parser, and sum the samples that match."""

from __future__ import annotations

from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = list[tuple[str, dict[str, str], float]]  # (sample name, labels, value)


def parse(text: str) -> Samples:
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=30)
    r.raise_for_status()
    return parse(r.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the `name` samples whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def by(samples: Samples, name: str, *keys: str, **labels: str) -> dict[tuple[str, ...], float]:
    """`sum by (keys)` of the matching `name` samples."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == w for k, w in labels.items()):
            out[tuple(lab[k] for k in keys)] += v
    return dict(out)


def names(samples: Samples) -> set[str]:
    return {n for n, _, _ in samples}
