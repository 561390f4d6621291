"""`--plot`: latency percentiles and output throughput over time, as a PNG (Agg canvas, no pyplot state)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .loadtest import LoadTestResult

PERCENTILES = (50, 90, 99)


def throughput_timeline(lt: LoadTestResult, bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, output tokens/s per bin): each successful request's tokens spread over its chunks."""
    bins = max(1, math.ceil(lt.duration / bin_s))
    tokens = np.zeros(bins)
    for r in lt.requests:
        if r.success and r.chunk_times:
            idx = np.minimum((np.asarray(r.chunk_times) / bin_s).astype(int), bins - 1)
            np.add.at(tokens, idx, r.output_tokens / len(r.chunk_times))
    edges = np.minimum(np.arange(bins + 1) * bin_s, max(lt.duration, 1e-9))
    return edges, tokens / np.maximum(np.diff(edges), 1e-9)


def plot_load_test(lt: LoadTestResult, path: str) -> None:
    ok = [r for r in lt.requests if r.success]
    series = {"TTFT": [r.ttft for r in ok], "ITL": [x for r in ok for x in r.itl], "E2E": [r.latency for r in ok]}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.6))
    width = 0.8 / len(PERCENTILES)
    for j, p in enumerate(PERCENTILES):
        values = [1e3 * float(np.percentile(v, p)) if v else 0.0 for v in series.values()]
        ax1.bar(np.arange(len(series)) + (j - (len(PERCENTILES) - 1) / 2) * width, values, width, label=f"p{p}")
    ax1.set_xticks(range(len(series)), list(series))
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log" if any(series.values()) else "linear")
    ax1.set_title("latency percentiles")
    ax1.legend()
    edges, tput = throughput_timeline(lt)
    ax2.stairs(tput, edges, fill=True, alpha=0.6)
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("output tokens/s (1 s bins)")
    r = lt.result
    ax2.set_title(f"{r['completed']} ok / {r['failed']} failed, rate {r['request_rate']} req/s, "
                  f"{r['output_throughput']:.0f} tok/s")
    ax2.set_xlim(0, edges[-1])
    ax2.grid(alpha=0.3)
    fig.suptitle(f"expertmesh loadtest: {r['model_id']} ({r['backend']})")
    fig.savefig(path, dpi=110)
