"""Kernel plans: the fastest candidate per row count wins, plans round-trip through the on-disk cache, processes
that measure at once end up running the same plan, and EXPERTMESH_KERNELS overrides the measurement."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.kernel_choice import (
    ENV,
    MEASURED_ROWS,
    Candidate,
    KernelPlan,
    cache_path,
    cached_plan,
    choose,
    describe_cpu,
    parse_setting,
    row_invariant_kernels,
)
from model.matmul import PreparedWeight, candidates, fixed_plan, linear, resolve_plan

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {"packed": "blocked", "plain_a": "plain", "plain_b": "plain", "upcast": "plain"}


def test_choose_mixes_the_fastest_kernels_of_one_layout_by_row_count():
    timings = {1: {"packed": 1.0, "plain_a": 2.0, "plain_b": 3.0, "upcast": 4.0},
               4: {"packed": 1.0, "plain_a": 2.0, "plain_b": 3.0, "upcast": 4.0},
               16: {"packed": 9.0, "plain_a": 2.0, "plain_b": 3.0},  # upcast dropped (lost at 1 and 4 rows)
               64: {"packed": 9.0, "plain_a": 3.0, "plain_b": 2.0}}
    # per layout: blocked (packed) costs (1+1+4.5+4.5)/4 = 2.75; plain's mix (a, a, a, b) (2+2+1+1)/4 = 1.5
    layout, kernels, invariant = choose(timings, LAYOUTS)
    assert (layout, kernels, invariant) == ("plain", ((1, "plain_a"), (32, "plain_b")), False)
    plan = KernelPlan("bfloat16", (8, 4), 1, layout, kernels, "measured")
    assert [plan.kernel_for(n) for n in (1, 16, 31, 32, 500)] == ["plain_a"] * 3 + ["plain_b"] * 2
    # plain_a alone costs 1.625: a row-invariant kernel within 5% of the mix (1.575) would run alone; it is not
    assert choose(timings, LAYOUTS, row_invariant={"plain_a"})[2] is False
    assert choose(timings, LAYOUTS, row_invariant={"plain_a"}, tolerance=0.1) == ("plain", ((1, "plain_a"),), True)


def test_mixed_ranges_start_at_the_geometric_midpoint():
    timings = {r: {"aten": 1.0 if r <= 2 else 3.0, "onednn_plain": 2.0} for r in (1, 2, 4, 16, 64)}
    layouts = {"aten": "plain", "onednn_plain": "plain"}
    assert choose(timings, layouts) == ("plain", ((1, "aten"), (3, "onednn_plain")), False)


def test_choose_takes_a_row_invariant_kernel_within_tolerance_or_when_insisted_on():
    timings = {r: {"packed": 1.04 * r, "plain_a": 1.0 * r} for r in (1, 4, 16, 64)}
    assert choose(timings, LAYOUTS, row_invariant={"packed"}) == ("blocked", ((1, "packed"),), True)
    assert choose(timings, LAYOUTS, row_invariant=set()) == ("plain", ((1, "plain_a"),), False)
    slow = {r: {"packed": 2.0 * r, "plain_a": 1.0 * r} for r in (1, 4, 16, 64)}
    assert choose(slow, LAYOUTS, row_invariant={"packed"}) == ("plain", ((1, "plain_a"),), False)
    assert choose(slow, LAYOUTS, row_invariant={"packed"}, tolerance=math.inf) == ("blocked", ((1, "packed"),), True)


def test_choose_prefers_native_bf16_where_it_is_faster():
    """Timings like an AVX512-BF16 CPU's pick oneDNN's bf16 product; an AVX2-only CPU's keep the upcast."""
    native = {r: {"onednn_packed": 0.3 * r, "aten": 0.9 * r, "upcast": 1.4 * r} for r in (1, 4, 16, 64)}
    assert choose(native, {"onednn_packed": "blocked", "aten": "plain", "upcast": "plain"}, {"onednn_packed"}) == (
        "blocked", ((1, "onednn_packed"),), True)
    avx2 = {1: {"aten": 0.5, "upcast": 0.8}, 4: {"aten": 2.0, "upcast": 0.9},
            16: {"aten": 8.0, "upcast": 1.2}, 64: {"upcast": 3.0}}
    assert choose(avx2, {"aten": "plain", "upcast": "plain"}, {"upcast"}) == ("plain", ((1, "upcast"),), True)


def test_choose_needs_every_row_count():
    with pytest.raises(ValueError, match="no timings"):
        choose({}, LAYOUTS)
    # packed has no timing at 4 rows, so plain_a wins even though packed is faster at 1
    assert choose({1: {"packed": 1.0, "plain_a": 2.0}, 4: {"plain_a": 2.0}}, LAYOUTS)[0] == "plain"


def _exact(x, w):  # one row at a time: the same bits whatever the product's rows
    return torch.stack([F.linear(r, w) for r in x]) if len(x) else F.linear(x, w)


def test_row_invariance_is_measured_not_assumed():
    """A kernel whose rows depend on the product's row count, or on a row's position in it, is found out."""
    def by_count(x, w):
        return F.linear(x, w) + x.shape[0] * 1e-3

    def by_position(x, w):
        return F.linear(x, w) + (torch.arange(x.shape[0]) >= 40).to(x.dtype)[:, None]

    cands = [Candidate(n, "plain", lambda w: w, run) for n, run in
             (("exact", _exact), ("by_count", by_count), ("by_position", by_position))]
    assert row_invariant_kernels((16, 8), torch.float32, cands) == {"exact"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_found_row_invariant_are(dtype):
    """What row_invariant_kernels reports holds for other rows and values (a real shape of the tests)."""
    found = row_invariant_kernels((512, 256), dtype, list(candidates(dtype)))
    g = torch.Generator().manual_seed(4)
    w = torch.randn(512, 256, generator=g).to(dtype)
    x = torch.randn(70, 256, generator=g).to(dtype)
    for c in (c for c in candidates(dtype) if c.name in found):
        pw = c.prepare(w)
        alone = torch.cat([c.run(x[i:i + 1], pw) for i in (0, 5, 16)])
        for n in (17, 24, 33, 64, 70):
            assert torch.equal(c.run(x[:n], pw)[[0, 5, 16]], alone), (c.name, n)


def sleeper(name: str, seconds: float) -> Candidate:
    def run(x, w):
        time.sleep(seconds)
        return x
    return Candidate(name, "plain", lambda w: w, run)


def test_plan_round_trips_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cands = [sleeper("slow", 0.002), sleeper("fast", 0.0)]
    plan = cached_plan((8, 4), torch.float32, cands, 1, fixed=lambda: pytest.fail("cache is writable"))
    assert plan.source == "measured" and plan.kernels == ((1, "fast"),)
    path = cache_path("float32", (8, 4), 1, ["fast", "slow"])
    assert path.is_file() and path.is_relative_to(tmp_path / "expertmesh" / "kernels")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
    again = cached_plan((8, 4), torch.float32, cands[::-1], 1, fixed=lambda: pytest.fail("unused"))
    assert again.source == "cache" and again.to_json() == plan.to_json()
    assert dict(again.timings_ms)[1][0][0] in ("slow", "fast")
    # another thread count, shape or dtype is another file
    assert cache_path("float32", (8, 4), 2, ["fast", "slow"]) != path != cache_path("bfloat16", (8, 4), 1,
                                                                                    ["fast", "slow"])


def test_a_file_already_there_wins(tmp_path, monkeypatch):
    """A process that finds another's plan runs it, even where its own measurement would pick otherwise."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cands = [sleeper("slow", 0.002), sleeper("fast", 0.0)]
    theirs = KernelPlan("float32", (8, 4), 1, "plain", ((1, "slow"),), "measured")
    path = cache_path("float32", (8, 4), 1, ["fast", "slow"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(theirs.to_json()))
    assert cached_plan((8, 4), torch.float32, cands, 1, fixed=lambda: pytest.fail("unused")).kernels == (
        (1, "slow"),)
    fixed = fixed_plan(torch.float32, (8, 4), 1)
    for damaged in ("{not json", json.dumps({**theirs.to_json(), "kernels": [[1, "warp"]]})):
        path.write_text(damaged)  # left alone (replacing it could race), and every process runs the fixed plan
        assert cached_plan((8, 4), torch.float32, cands, 1, fixed=lambda: fixed) is fixed
        assert path.read_text() == damaged


def test_unwritable_cache_falls_back_to_the_fixed_plan(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the cache dir should be
    fixed = fixed_plan(torch.float32, (8, 4), 1)
    assert cached_plan((8, 4), torch.float32, [sleeper("a", 0.0)], 1, fixed=lambda: fixed) is fixed


RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from model.kernel_choice import Candidate, cached_plan
    me, go = sys.argv[1], Path(sys.argv[2])
    def sleeper(name, s):
        return Candidate(name, "plain", lambda w: w, lambda x, w: time.sleep(s) or x)
    # each process finds a different kernel faster, so their measurements disagree
    cands = [sleeper("a", 0.0 if me == "0" else 0.003), sleeper("b", 0.003 if me == "0" else 0.0)]
    Path(f"{go}.ready{me}").write_text("")
    while not go.exists():
        time.sleep(0.001)
    plan = cached_plan((8, 4), torch.float32, cands, 1, fixed=lambda: sys.exit("fixed plan used"))
    print(json.dumps({"kernels": plan.kernels, "source": plan.source}))
""")


def test_processes_measuring_at_once_agree(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(i), str(go)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.ready{i}").exists() for i in range(2)):  # both imported torch: start together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "racers did not start"
        time.sleep(0.01)
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    (path,) = (tmp_path / "cache" / "expertmesh" / "kernels").glob("*.json")
    on_disk = [list(k) for k in json.loads(path.read_text())["kernels"]]
    assert results[0]["kernels"] == results[1]["kernels"] == on_disk
    assert {r["source"] for r in results} <= {"measured", "cache"}


def test_measured_plan_for_real_kernels(tmp_path, monkeypatch):
    """The real candidates, timed at a small shape: the plan names only kernels that run here, is written to
    the cache, and the prepared weight computes the product."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    cands = list(candidates(torch.bfloat16))
    t0 = time.perf_counter()
    plan = cached_plan((48, 40), torch.bfloat16, cands, torch.get_num_threads(), fixed=lambda: pytest.fail("x"))
    assert time.perf_counter() - t0 < 10
    assert plan.source == "measured" and {k for _, k in plan.kernels} <= {c.name for c in cands}
    assert sorted(dict(plan.timings_ms)) == list(MEASURED_ROWS)
    assert cached_plan((48, 40), torch.bfloat16, cands, torch.get_num_threads(), fixed=lambda: None).source == "cache"
    resolved = resolve_plan(torch.bfloat16, (48, 40), torch.get_num_threads(), "measure")
    assert (resolved.layout, resolved.kernels) == (plan.layout, plan.kernels)
    # `invariant` insists on a row-invariant kernel (one exists at this shape), in a cache file of its own
    strict = resolve_plan(torch.bfloat16, (48, 40), torch.get_num_threads(), "invariant")
    assert strict.row_invariant and len(strict.kernels) == 1 and "[row-invariant]" in strict.describe()
    assert len(list((tmp_path / "expertmesh" / "kernels").iterdir())) == 2
    w = PreparedWeight.build(torch.randn(48, 40).to(torch.bfloat16), strict)
    x = torch.randn(40, 40).to(torch.bfloat16)
    assert torch.equal(w(x)[[0, 9, 33]], torch.cat([w(x[i:i + 1]) for i in (0, 9, 33)]))


def test_environment_override(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    threads = torch.get_num_threads()
    assert resolve_plan(torch.float32, (24, 8), threads, "fixed") == fixed_plan(torch.float32, (24, 8), threads)
    plan = resolve_plan(torch.bfloat16, (24, 8), threads, "bf16=upcast, float32=aten")
    assert plan.kernels == ((1, "upcast"),) and plan.source == "env"
    assert resolve_plan(torch.float32, (24, 8), threads, "bf16=upcast,float32=aten").kernels == ((1, "aten"),)
    assert not (tmp_path / "expertmesh").exists()  # nothing measured
    monkeypatch.setenv(ENV, "bfloat16=aten")
    from model.matmul import prepare_weight

    w = torch.randn(24, 8).to(torch.bfloat16)
    p = prepare_weight(w)
    assert p.plan.kernels == ((1, "aten"),)
    x = torch.randn(7, 8).to(torch.bfloat16)
    assert torch.equal(linear(x, p), F.linear(x, w))


@pytest.mark.parametrize(("text", "message"), [
    ("fast", "expected 'measure', 'invariant', 'fixed' or dtype=kernel"),
    ("float16=aten", "expected 'measure', 'invariant', 'fixed' or dtype=kernel"),
    ("bfloat16=warp", "kernel 'warp' for bfloat16 is not available here"),
    ("float32=upcast", "kernel 'upcast' for float32"),
])
def test_bad_override_names_the_variable(text, message):
    kernels = {"bfloat16": {"aten", "upcast"}, "float32": {"aten"}}
    with pytest.raises(ValueError, match=ENV) as e:
        parse_setting(text, kernels)
    assert message in str(e.value)
    assert parse_setting(None, kernels) == parse_setting(" measure ", kernels) == "measure"


def test_cpu_description_names_the_flags():
    text = describe_cpu()
    assert ";" in text and any(f in text for f in ("avx2", "none of"))
