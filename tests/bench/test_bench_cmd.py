"""`expertmesh bench` reproduces every benchmark table in one run (tiny settings here; figures are not asserted)."""

import json

import pytest

from cluster.cli import main
from model.random_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bench") / "ck", "tiny", seed=1)


def test_all_sections_produce_tables_and_json(ck, tmp_path, capsys, ray_session):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(ck), "--batch-sizes", "1,4", "--gen-len", "4", "--workers", "2",
            "--serving-workers", "2", "--num-prompts", "8", "--dtypes", "float32", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    tables = capsys.readouterr().out
    for title in ("vs HF transformers", "through expert workers", "serving"):
        assert title in tables
    report = json.loads(out.read_text())
    assert [(r["dtype"], r["batch"]) for r in report["decode"]] == [("float32", 1), ("float32", 4)]
    assert all(r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in report["decode"])
    dist = [r for r in report["distributed"] if r["config"] == "2 workers"]
    assert [r["batch"] for r in dist] == [1, 4]
    assert all(r["rpcs_per_step"] > 0 and r["expert_s"] > 0 for r in dist)
    # each ratio compares against the in-process runs interleaved with it
    assert all(r["ratio"] == pytest.approx(r["tok_s"] / r["in_process_tok_s"]) for r in dist)
    # one pair per batch (--repeats 1): its ratio is also the median pair ratio
    assert all(r["ratio_median"] == pytest.approx(r["ratio"]) for r in dist)
    assert [r["batch"] for r in report["distributed"] if r["config"] == "in-process"] == [1, 4]
    # overlap rows where there are two sequences to split: twice the Dispatches, no wall-clock split
    (over,) = [r for r in report["distributed"] if r["config"] == "2 workers, overlap"]
    assert over["batch"] == 4 and over["tok_s"] > 0 and over["router_s"] is None and over["wire_s"] is None
    assert over["rpcs_per_step"] > dist[1]["rpcs_per_step"]
    ours, hf = report["serving"]
    assert ours["completed"] == 8 and ours["failed"] == 0 and hf["completed"] == 8
    assert ours["output_tok_s"] > 0 and ours["vs_hf"] > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "--sections", "decode,nope"], "--sections"),
    (["bench", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["bench", "--workers", "0"], "--workers"),
    (["bench", "--dtypes", "int4"], "dtype"),
    (["bench", "--device", "tpu"], "--device: expected cpu or cuda[:N], got 'tpu'"),
    (["bench", "--device", "cuda:7"], "--device cuda:7: "),
])
def test_bad_flags(argv, message, capsys, ck):
    assert main([*argv, "--model", str(ck)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["grouped_mm", "padded"])
def test_decode_section_with_stacked_experts(ck, tmp_path, capsys, impl):
    """The decode table of the GPU path (stacked experts), here on the CPU device."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(ck), "--sections", "decode", "--device", "cpu", "--experts-impl", impl,
            "--dtypes", "float32", "--batch-sizes", "2", "--gen-len", "3", "--repeats", "1", "--hf-experts", "eager",
            "--json", str(out)]
    assert main(argv) == 0
    assert f"experts: stacked, {impl}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    (row,) = report["decode"]
    assert row["batch"] == 2 and row["ours_tok_s"] > 0 and row["hf_experts"] == "eager"
    assert report["decode_kernels"]["kernels"]["float32"]["experts"].startswith(f"stacked, {impl}")
