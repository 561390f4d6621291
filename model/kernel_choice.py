"""Which kernel runs a weight product, chosen by timing the candidates on this machine, cached on disk.

For one weight shape, dtype and torch thread count, `measure` times every candidate kernel (`model/matmul.py`
lists them) at a few row counts, on copies of the real weight that together exceed the last-level cache (so
the weights stream from DRAM, as when a layer's experts run), candidates interleaved so machine load hits
them alike. `row_invariant_kernels` checks, on a random weight of the real shape, which candidates give a row
the same bits whatever the row count and position of the product it is in: no kernel is assumed to (oneDNN's
products are on small shapes and on AVX2, but not on AMX, where M > 32 rows take another path and some fp32
shapes change with every row count).

`choose` keeps one layout per weight (one copy in memory). Where a row-invariant kernel costs at most
INVARIANT_TOLERANCE more (mean slowdown against the best kernel per row count) than the fastest kernels of
one layout picked per row count, it runs at every row count: then a row's result never depends on how many
rows share its product, so splitting an expert's rows over replicas, two micro-batches or the engine's
bisection change no bit. Otherwise the plan runs the fastest kernel of its layout per row-count range and says
so (`row_invariant` False): results then agree across splits to float rounding, not bit for bit.
EXPERTMESH_KERNELS=invariant insists on a row-invariant kernel wherever one exists, at any cost.

Bit-exactness: the kernels give different bits, so every process on a machine must run the same plan (the
in-process model and the expert workers compare bit for bit). The plan is cached per (CPU model and flags,
torch version, dtype, shape, thread count, mode) under $XDG_CACHE_HOME/expertmesh/kernels (default ~/.cache):
the file appears atomically (written aside, then hard-linked into place, which fails if it exists), so when
two processes measure at once the first file wins and the other adopts it before serving. Where the cache
cannot be written, the deterministic `fixed` plan runs, so processes still agree.

EXPERTMESH_KERNELS overrides: `fixed` (no measuring: the pre-measurement defaults), `measure` (the default),
`invariant` (measure, and run a row-invariant kernel wherever there is one), or per dtype
`bfloat16=onednn_packed,float32=aten` (that kernel at every row count; dtypes not named are measured).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ENV = "EXPERTMESH_KERNELS"
SCHEME = 5  # bump when kernels or the measurement change meaning: old cache files are then ignored
MEASURED_ROWS = (1, 2, 4, 16, 64)  # each covers the row counts from the geometric midpoint with the previous
# rows of the products compared with one 128-row product, at offset 0 and elsewhere (row_invariant_kernels)
INVARIANCE_ROWS = (1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 24, 31, 32, 33, 40, 48, 57, 64, 65, 80, 96, 127)
INVARIANT_TOLERANCE = 0.05  # a row-invariant kernel is taken while its mean slowdown is at most 5% worse
STREAM_BYTES = 64 << 20  # weight copies timed in turn: more than a last-level cache holds
MAX_COPIES = 8
CALLS = 3  # timed calls per (candidate, row count): more while a row count took under MIN_ROW_SECONDS,
MAX_CALLS = 24  # ... up to MAX_CALLS; fewer (at least 2) once it took MAX_ROW_SECONDS (the largest weights)
MIN_ROW_SECONDS = 0.05
MAX_ROW_SECONDS = 0.1
DROP_FACTOR = 3.0  # a candidate this much slower than the best at two row counts in a row is not timed further
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}

Tensor = torch.Tensor
Kernel = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Candidate:
    """A kernel and the weight layout it reads (`prepare` turns a plain [out, in] weight into that layout)."""

    name: str
    layout: str
    prepare: Callable[[Tensor], Tensor]
    run: Kernel


@dataclass(frozen=True)
class KernelPlan:
    """The kernel per row count for one (dtype, weight shape, thread count) on this machine."""

    dtype: str
    shape: tuple[int, int]  # [out, in]
    threads: int
    layout: str
    kernels: tuple[tuple[int, str], ...]  # (first row count, kernel) ascending from 1; the last covers all above
    source: str  # measured | cache | fixed | env
    timings_ms: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()  # per measured row count
    row_invariant: bool = False  # measured: a row's bits do not depend on the product's row count or position

    def kernel_for(self, rows: int) -> str:
        name = self.kernels[0][1]
        for first, kernel in self.kernels:
            if rows < first:
                break
            name = kernel
        return name

    def describe(self) -> str:
        ranges = [f"{first}+: {k}" for first, k in self.kernels]
        bits = "row-invariant" if self.row_invariant else "bits depend on row count"
        return f"{self.dtype} {self.shape[0]}x{self.shape[1]} ({self.source}): " + ", ".join(ranges) + f" [{bits}]"

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "threads": self.threads, "layout": self.layout,
                "kernels": [list(k) for k in self.kernels], "row_invariant": self.row_invariant,
                "timings_ms": {str(r): dict(t) for r, t in self.timings_ms}}

    @staticmethod
    def from_json(d: Mapping, source: str) -> KernelPlan:
        return KernelPlan(dtype=d["dtype"], shape=(int(d["shape"][0]), int(d["shape"][1])), threads=int(d["threads"]),
                          layout=d["layout"], kernels=tuple((int(r), str(k)) for r, k in d["kernels"]),
                          source=source, timings_ms=tuple((int(r), tuple((k, float(v)) for k, v in t.items()))
                                                          for r, t in d.get("timings_ms", {}).items()),
                          row_invariant=bool(d.get("row_invariant", False)))


def choose(timings: Mapping[int, Mapping[str, float]], layouts: Mapping[str, str],
           row_invariant: Collection[str] = (), tolerance: float = INVARIANT_TOLERANCE,
           ) -> tuple[str, tuple[tuple[int, str], ...], bool]:
    """(layout, kernel ranges, row-invariant) from seconds per (row count, kernel); a kernel missing at a row
    count lost there.

    Cost of kernels = mean slowdown against the best kernel per row count. The fastest mix: per layout, the
    fastest of its kernels at each row count (a layout is one copy of the weight, so a plan never mixes two);
    the layout with the lowest cost wins. The `row_invariant` kernel with the lowest cost (timed at every row
    count) is taken alone where its cost is at most (1 + tolerance) x the mix's: then splitting a product's
    rows changes no bit. Ranges: the kernel of a measured row count runs from the geometric midpoint with the
    previous one."""
    rows = sorted(timings)
    if not rows:
        raise ValueError("no timings to choose from")
    best = {r: min(timings[r].values()) for r in rows}

    def cost(per_row: list[str]) -> float:  # the kernel at each row count, in `rows` order
        return sum(timings[r][k] / best[r] for r, k in zip(rows, per_row, strict=True)) / len(rows)

    complete = [k for k in layouts if all(k in timings[r] for r in rows)]
    if not complete:
        raise ValueError("no kernel has a timing at every row count")
    mixes = {}
    for layout in dict.fromkeys(layouts[k] for k in complete):
        own = [k for k in complete if layouts[k] == layout]
        mixes[layout] = [min(own, key=lambda k, r=r: timings[r][k]) for r in rows]  # ties: the first listed
    layout = min(mixes, key=lambda lay: cost(mixes[lay]))
    mix = mixes[layout]
    invariant = [k for k in complete if k in row_invariant]
    single = min(invariant, key=lambda k: cost([k] * len(rows)), default=None)
    if single is not None and cost([single] * len(rows)) <= (1 + tolerance) * cost(mix):
        return layouts[single], ((1, single),), True
    ranges: list[tuple[int, str]] = []
    for i, (r, k) in enumerate(zip(rows, mix, strict=True)):
        if not ranges or ranges[-1][1] != k:
            ranges.append((1 if i == 0 else math.ceil(math.sqrt(rows[i - 1] * r)), k))
    return layout, tuple(ranges), len(ranges) == 1 and ranges[0][1] in row_invariant


def row_invariant_kernels(shape: tuple[int, int], dtype: torch.dtype, candidates: list[Candidate],
                          rows: tuple[int, ...] = INVARIANCE_ROWS) -> set[str]:
    """The candidates that give every row the same bits in a product of n rows (at offset 0 and at another
    offset) as in one product of max(rows) + 1 rows, for each n in `rows`, on a random weight of `shape`."""
    g = torch.Generator().manual_seed(1)
    total = max(rows) + 1
    found = set()
    with torch.inference_mode():
        w = torch.randn(shape, generator=g).to(dtype)  # random values: a constant weight hides summation order
        x = torch.randn(total, shape[1], generator=g).to(dtype)
        prepared = {c.layout: c.prepare(w) for c in candidates}
        for c in candidates:
            wc = prepared[c.layout]
            full = c.run(x, wc)
            spans = [(o, o + n) for n in rows for o in dict.fromkeys((0, (7 * n + 3) % (total - n + 1)))]
            if all(torch.equal(c.run(x[a:b], wc), full[a:b]) for a, b in spans):
                found.add(c.name)
    return found


def measure(shape: tuple[int, int], dtype: torch.dtype, candidates: list[Candidate],
            rows: tuple[int, ...] = MEASURED_ROWS, calls: int = CALLS,
            row_invariant: Collection[str] = ()) -> dict[int, dict[str, float]]:
    """Seconds of the fastest of about `calls` calls (see CALLS) of each candidate at each row count, after one
    warm-up call.

    The weights are random [out, in] copies, each call reading the next copy of its layout, so the weight
    comes from DRAM as in serving; candidates take turns, so load from other processes hits them alike, and
    the fastest call is the one least disturbed by it."""
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(MAX_COPIES, -(-STREAM_BYTES // nbytes)))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        w = torch.full(shape, 0.01, dtype=dtype)  # GEMM time does not depend on the values
        plain = [w] + [w.clone() for _ in range(copies - 1)]
        weights = {lay: [prep(c) for c in plain] for lay, prep in {c.layout: c.prepare for c in candidates}.items()}
        turn = dict.fromkeys(weights, 0)
        active = list(candidates)
        strikes = dict.fromkeys((c.name for c in candidates), 0)
        timings: dict[int, dict[str, float]] = {}
        for n in rows:
            x = torch.empty(n, shape[1]).uniform_(-1, 1, generator=g).to(dtype)
            t = dict.fromkeys((c.name for c in active), math.inf)
            start = time.perf_counter()
            for i in range(MAX_CALLS + 1):
                took = time.perf_counter() - start
                if i > calls and took > MIN_ROW_SECONDS or i > 2 and took > MAX_ROW_SECONDS:
                    break
                for c in active:
                    wc = weights[c.layout][turn[c.layout] % copies]
                    turn[c.layout] += 1
                    t0 = time.perf_counter()
                    c.run(x, wc)
                    if i:  # the first call builds the kernel for this shape
                        t[c.name] = min(t[c.name], time.perf_counter() - t0)
            timings[n] = t
            fastest = min(t.values())
            for c in active:
                strikes[c.name] = strikes[c.name] + 1 if t[c.name] > DROP_FACTOR * fastest else 0
            # the fastest row-invariant kernel stays timed: `choose` may prefer it to faster row-dependent ones
            keep = min((c for c in active if c.name in row_invariant), key=lambda c: t[c.name], default=None)
            active = [c for c in active if strikes[c.name] < 2 or c is keep]
    return timings


def plan_by_measuring(shape: tuple[int, int], dtype: torch.dtype, candidates: list[Candidate],
                      threads: int, insist_invariant: bool = False) -> KernelPlan:
    invariant = row_invariant_kernels(shape, dtype, candidates)
    timings = measure(shape, dtype, candidates, row_invariant=invariant)
    layout, kernels, is_invariant = choose(timings, {c.name: c.layout for c in candidates}, invariant,
                                           math.inf if insist_invariant else INVARIANT_TOLERANCE)
    ms = tuple((r, tuple((k, round(s * 1e3, 4)) for k, s in t.items())) for r, t in sorted(timings.items()))
    return KernelPlan(dtype=dtype_name(dtype), shape=shape, threads=threads, layout=layout, kernels=kernels,
                      source="measured", timings_ms=ms, row_invariant=is_invariant)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(model name, which of CPU_FLAGS it has): what the cache is keyed on, and what `bench` prints."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, tuple(f for f in CPU_FLAGS if f in flags)


def describe_cpu() -> str:
    name, flags = cpu_identity()
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"{name}; {' '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}" + (
        f" (no {', '.join(missing)})" if missing and flags else "")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expertmesh" / "kernels"


def cache_path(dtype: str, shape: tuple[int, int], threads: int, candidates: list[str],
               insist_invariant: bool = False) -> Path:
    name, flags = cpu_identity()
    key = {"scheme": SCHEME, "cpu": name, "flags": list(flags), "torch": torch.__version__, "dtype": dtype,
           "shape": list(shape), "threads": threads, "candidates": sorted(candidates)}
    if insist_invariant:
        key["mode"] = "invariant"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{dtype}-{shape[0]}x{shape[1]}-t{threads}-{digest}.json"


class DamagedPlan(ValueError):
    pass


def read_plan(path: Path, valid: set[str]) -> KernelPlan | None:
    """The plan in `path`, None when there is none; DamagedPlan when it cannot be read or names kernels this
    process does not have."""
    try:
        plan = KernelPlan.from_json(json.loads(path.read_text()), "cache")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DamagedPlan(f"kernel plan {path} is unreadable ({e})") from e
    if not {k for _, k in plan.kernels} <= valid:
        raise DamagedPlan(f"kernel plan {path} names kernels not available here")
    return plan


def publish(path: Path, plan: KernelPlan) -> bool:
    """Write `plan` to `path` unless a file is there already (first writer wins); False if it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(plan.to_json(), indent=1))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot write kernel plan %s (%s)", path, e)
        return False
    return True


def cached_plan(shape: tuple[int, int], dtype: torch.dtype, candidates: list[Candidate], threads: int,
                fixed: Callable[[], KernelPlan], insist_invariant: bool = False) -> KernelPlan:
    """This machine's plan for the shape and dtype: from the cache, else measured and published (adopting
    whichever file won), else `fixed()` when the cache cannot be written or holds a damaged file (which is
    left for the user to delete: replacing it could race with another process doing the same)."""
    valid = {c.name for c in candidates}
    path = cache_path(dtype_name(dtype), shape, threads, sorted(valid), insist_invariant)
    try:
        plan = read_plan(path, valid)
        if plan is not None:
            return plan
        t0 = time.perf_counter()
        measured = plan_by_measuring(shape, dtype, candidates, threads, insist_invariant)
        log.info("measured kernels in %.2f s: %s", time.perf_counter() - t0, measured.describe())
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if busy > (os.cpu_count() or 1):
            log.warning("kernels for %s measured with load average %.1f on %d CPUs: timings may not hold on a "
                        "quiet machine; delete %s to measure again", measured.describe(), busy,
                        os.cpu_count() or 1, path)
        if not publish(path, measured):
            return fixed()
        adopted = read_plan(path, valid)
    except DamagedPlan as e:
        log.warning("%s; running the fixed kernels (delete the file to measure again)", e)
        return fixed()
    if adopted is None:
        return fixed()
    same = (adopted.layout, adopted.kernels) == (measured.layout, measured.kernels)
    return measured if same else adopted  # another process's file won: run its choice


def parse_setting(text: str | None, kernels: Mapping[str, set[str]]) -> dict[str, str] | str:
    """EXPERTMESH_KERNELS: "measure" (unset too), "invariant", "fixed", or {dtype: kernel} for
    `dtype=kernel,...`."""
    text = (text or "").strip()
    if text in ("", "measure", "invariant", "fixed"):
        return text or "measure"
    chosen: dict[str, str] = {}
    for part in text.split(","):
        key, sep, kernel = (s.strip() for s in part.partition("="))
        dtype = DTYPE_NAMES.get(key)
        if not sep or dtype is None:
            raise ValueError(f"{ENV}={text!r}: expected 'measure', 'invariant', 'fixed' or dtype=kernel pairs like "
                             f"'bfloat16=onednn_packed,float32=aten' (dtypes: {', '.join(kernels)})")
        if kernel not in kernels[dtype]:
            raise ValueError(f"{ENV}={text!r}: kernel {kernel!r} for {dtype} is not available here "
                             f"(available: {', '.join(sorted(kernels[dtype]))})")
        chosen[dtype] = kernel
    return chosen
