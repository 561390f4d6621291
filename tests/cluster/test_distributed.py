"""Experts in Ray actors over gRPC give exactly the in-process model's tokens and logits, and HF's."""

import collections

import pytest
import ray
import torch

from cluster.deployment import ClusterConfig, ExpertCluster
from cluster.placement import PlacementPlan
from model.experts import LocalExperts
from model.generation import generate
from model.mixtral import Mixtral
from model.sampling import SamplingParams
from tests.model.hf_reference import assert_close, assert_rows_close, hf_greedy, hf_logits, write_hf_checkpoint

PROMPTS = [list(range(5, 25)), [7, 3, 250, 11], list(range(100, 140))]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


class RecordingExperts:
    """Wraps LocalExperts and records, per forward step and layer, which experts were hit."""

    def __init__(self, inner: LocalExperts):
        self.inner, self.hits, self.step = inner, [], 0

    def __call__(self, layer, hidden, expert_ids, weights):
        if layer == 0:
            self.step += 1
        self.hits.append((self.step, layer, set(expert_ids.reshape(-1).tolist()), hidden.shape[0]))
        return self.inner(layer, hidden, expert_ids, weights)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    hf = write_hf_checkpoint(d, seed=11)
    local = Mixtral.from_pretrained(d)
    local.experts = RecordingExperts(local.experts)
    tokens, logits = generate(local, PROMPTS, PARAMS, return_logits=True)
    return d, hf, local, tokens, logits


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_distributed_equals_in_process_and_hf(ray_session, checkpoint, workers):
    d, hf, local, tokens, logits = checkpoint
    placement = "round-robin" if workers == 3 else "contiguous"
    with ExpertCluster(ClusterConfig(str(d), workers, placement=placement)) as cluster:
        infos = cluster.worker_infos()
        ray.get(cluster.router.record_dispatches.remote(True))
        out, remote_logits = ray.get(cluster.router.generate.remote(PROMPTS, PARAMS, True))
        log = ray.get(cluster.router.dispatch_log.remote())
        stats = ray.get(cluster.router.dispatch_stats.remote())
        router_info = ray.get(cluster.router.info.remote())
    assert out == tokens
    for ours, ref in zip(remote_logits, logits, strict=True):
        assert_close(ours, ref, rtol=1e-5)
    for p, toks, ours in zip(PROMPTS, out, remote_logits, strict=True):  # every decode step, against HF
        assert ours.shape[0] == PARAMS.max_tokens
        assert_rows_close(ours, hf_logits(hf, p + toks)[len(p) - 1:-1], rtol=1e-5)
    assert out[0] == hf_greedy(hf, PROMPTS[0], PARAMS.max_tokens)

    # Every worker loaded only its own experts, and every expert lives on exactly one worker.
    plan = PlacementPlan.build(2, 8, workers, placement)
    for w, info in enumerate(infos):
        assert sorted(map(tuple, info["pairs"])) == plan.pairs(w)
        assert info["load_stats"]["tensors_read"] == 3 * len(plan.pairs(w))
        assert info["torch_threads"] == 1
    assert router_info["torch_threads"] == 1

    # Exactly one Dispatch per (layer, worker that has tokens) per step.
    owner = plan.worker_of_expert()
    addr_of = {w: info["address"] for w, info in enumerate(infos)}
    sent = collections.Counter(log)
    assert max(sent.values()) == 1
    expected = {(step, layer, addr_of[owner[e]]) for step, layer, hit, _ in local.experts.hits for e in hit}
    assert set(sent) == expected
    assert stats["rpcs"] == len(expected)

    # Bytes on the wire: tokens x top-k x hidden x 4 bytes x 2 directions, within 5%.
    pairs = sum(n * 2 for _, _, _, n in local.experts.hits)
    ideal = pairs * 64 * 4 * 2
    assert abs(stats["bytes_sent"] + stats["bytes_received"] - ideal) <= 0.05 * ideal


@pytest.fixture(scope="module")
def bf16_in_process(checkpoint):
    d = checkpoint[0]
    local = Mixtral.from_pretrained(d, dtype="bfloat16")
    assert local.embed.dtype == torch.bfloat16
    tokens, logits = generate(local, PROMPTS, PARAMS, return_logits=True)
    return tokens, logits


@pytest.mark.parametrize("workers", [2, 4])
def test_bf16_through_workers_equals_bf16_in_process_bit_for_bit(ray_session, checkpoint, bf16_in_process, workers):
    """The README's headline configuration: bf16 experts in Ray actors over gRPC give exactly (bit for bit) the
    in-process bf16 model's tokens and logits."""
    d = checkpoint[0]
    tokens, logits = bf16_in_process
    with ExpertCluster(ClusterConfig(str(d), workers, dtype="bfloat16")) as cluster:
        infos = cluster.worker_infos()
        out, remote_logits = ray.get(cluster.router.generate.remote(PROMPTS, PARAMS, True))
    assert [i["dtype"] for i in infos] == ["bfloat16"] * workers
    assert out == tokens
    for ours, ref in zip(remote_logits, logits, strict=True):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)
