"""`expertmesh bench --sections soak`: a short real soak on the tiny model, plus its flag checks and request mix."""

import json

import pytest

from bench.soak import Mix, SoakBench, rss_mb
from cluster.cli import main
from model.random_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("soak") / "ck", "tiny", seed=1)


def test_soak_section_reports_windows_and_summary(ck, tmp_path, capsys, ray_session):
    out = tmp_path / "soak.json"
    argv = ["bench", "--sections", "soak", "--model", str(ck), "--minutes", "0.3", "--soak-window-s", "5",
            "--soak-warmup-s", "5", "--soak-workers", "1", "--soak-concurrency", "4", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "soak summary" in printed and "router RSS" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"model", "soak"}  # only the section asked for
    soak = report["soak"]
    rows, s = soak["windows"], soak["summary"]
    # 18 s in 5 s windows: a warm-up window, three soak windows (the last one 3 s), then the drain
    assert [r["phase"] for r in rows] == ["warmup", "soak", "soak", "soak", "drain"]
    assert all(r["router_rss_mb"] > 0 and r["workers_rss_mb"] > 0 for r in rows)
    assert all(r["kv_blocks_used"] is not None and r["running"] is not None for r in rows)
    assert all(r["completed"] > 0 and r["e2e_p99_ms"] >= r["e2e_p50_ms"] > 0 for r in rows[:-1])
    assert sum(r["ttft_p50_ms"] is not None for r in rows) >= 3
    assert s["unexpected_errors"] == 0, s["error_reasons"]
    assert s["completed"] == sum(r["completed"] for r in rows) > 0
    assert s["rejected_4xx"] > 0 and s["dropped"] > 0  # the deliberate 400s and the hang-ups
    assert s["requests_sent"] == s["completed"] + s["rejected_4xx"] + s["dropped"]
    assert s["router_rss_baseline_mb"] == rows[0]["router_rss_mb"]
    assert s["router_rss_final_mb"] == rows[-2]["router_rss_mb"]
    assert s["router_rss_max_mb"] >= s["router_rss_final_mb"]
    assert s["router_rss_growth_pct"] == pytest.approx(
        100 * (s["router_rss_final_mb"] / s["router_rss_baseline_mb"] - 1))
    # dropped clients' requests were aborted: nothing left running and every KV block is free again
    assert s["kv_blocks_used_after_drain"] == 0 and s["running_after_drain"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--minutes", "0"], "--minutes: expected a number > 0"),
    (["--minutes", "-1"], "--minutes: expected a number > 0"),
    (["--minutes", "abc"], "--minutes: expected a number"),
    (["--minutes", "nan"], "--minutes"),
    (["--minutes", "0.1", "--soak-window-s", "0"], "--soak-window-s"),
    (["--minutes", "0.1", "--soak-warmup-s", "-1"], "--soak-warmup-s"),
    (["--minutes", "0.1", "--soak-window-s", "10", "--soak-warmup-s", "6"], "leaves no window after"),
])
def test_bad_soak_flags(extra, message, capsys, ck):
    assert main(["bench", "--sections", "soak", "--model", str(ck), *extra]) == 2
    assert message in capsys.readouterr().err


def test_soak_flags_need_the_soak_section(capsys, ck):
    assert main(["bench", "--sections", "decode", "--model", str(ck), "--minutes", "1"]) == 2
    assert "only used by the soak section" in capsys.readouterr().err


def test_soak_is_not_a_default_section():
    from bench.bench_cmd import DEFAULT_SECTIONS, SECTIONS

    assert "soak" in SECTIONS and "soak" not in DEFAULT_SECTIONS.split(",")


def test_mix_is_seeded_and_covers_every_kind():
    cfg = SoakBench("unused", minutes=1, bad_every=5, drop_every=4)
    a, b = Mix(cfg, 512, 512), Mix(cfg, 512, 512)
    specs = [a.next() for _ in range(200)]
    assert specs == [b.next() for _ in range(200)]
    kinds = [s.kind for s in specs]
    assert kinds.count("bad") == 40 and kinds.count("drop") == 50 - 10  # bad wins when both fall due
    assert {s.stream for s in specs if s.kind == "ok"} == {True, False}
    for s in specs:
        if s.kind == "ok":
            assert 4 <= len(s.body["prompt"]) <= 96 and 1 <= s.max_tokens <= 48
            assert all(3 <= t < 512 for t in s.body["prompt"])
            assert len(s.body["prompt"]) + s.max_tokens <= 512


def test_rss_of_this_process():
    import os

    assert rss_mb(os.getpid()) > 0
    assert rss_mb(None) is None and rss_mb(2**22 + 12345) is None
