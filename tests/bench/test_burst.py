"""`expertmesh bench --sections burst`: 20x the waiting-queue bound at once against a real cluster's server."""

import pytest

from bench.burst import BurstBench, run_burst_bench
from model.random_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("burst") / "ck", "tiny", seed=2)


def test_a_burst_is_shed_and_everything_admitted_completes(ck, ray_session):
    cfg = BurstBench(str(ck), workers=1, max_waiting=2, max_num_seqs=2, factor=20, rounds=2, output_len=4,
                     settle_s=1.0)
    rows = run_burst_bench(cfg, log=lambda *_: None)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sent"] == 40 and r["served_200"] + r["shed_429"] == 40 and r["other"] == 0, r
        assert r["served_200"] >= 2 and r["shed_429"] >= 20 and r["bad_bodies"] == 0, r  # >= max_waiting
        assert r["kv_blocks_used_after"] == 0 and r["running_after"] == r["waiting_after"] == 0, r
        assert r["rss_after_mb"] > 0 and r["shed_p99_ms"] is not None


def test_burst_config_is_checked():
    with pytest.raises(ValueError, match="factor"):
        BurstBench("x", factor=0).validate()
