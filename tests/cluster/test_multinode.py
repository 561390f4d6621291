"""A simulated 3-node cluster (ray.cluster_utils.Cluster, 3 fake GPUs each): one GPU bundle per worker, SPREAD
puts them on different nodes, PACK on one. It runs in a subprocess because the test session already owns a Ray."""

import json
import subprocess
import sys
import textwrap

import pytest

from model.generation import generate
from model.mixtral import Mixtral
from model.sampling import SamplingParams
from tests.model.hf_reference import write_hf_checkpoint

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from cluster.deployment import ClusterConfig, ExpertCluster
    from model.sampling import SamplingParams

    model_dir, strategy = sys.argv[1], sys.argv[2]
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 3})
    for _ in range(2):
        sim.add_node(num_cpus=3, num_gpus=3)
    sim.wait_for_nodes()
    ray.init(address=sim.address, include_dashboard=False, log_to_driver=False)
    with ExpertCluster(ClusterConfig(model_dir, 2, pg_strategy=strategy)) as c:
        infos = c.worker_infos()
        router = ray.get(c.router.info.remote())
        out, _ = ray.get(c.router.generate.remote([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True)))
        gpus_per_bundle = [b.get("GPU", 0) for pg in c.placement_groups()
                           for b in ray.util.placement_group_table(pg)["bundles"].values()]
    ray.shutdown()
    sim.shutdown()
    print("RESULT " + json.dumps({"workers": [i["node_id"] for i in infos], "router": router["node_id"],
                                  "tokens": out[0], "gpus": gpus_per_bundle,
                                  "devices": [i["device"] for i in infos], "router_device": router["device"],
                                  "dtypes": [i["dtype"] for i in infos]}))
""")


@pytest.mark.parametrize("strategy", ["SPREAD", "PACK"])
def test_simulated_gpu_nodes(tmp_path, strategy):
    write_hf_checkpoint(tmp_path / "ck", seed=2)
    script = tmp_path / "multinode.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), strategy], capture_output=True,
                          text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[0][len("RESULT "):])
    assert r["gpus"] == [1.0, 1.0, 1.0]  # each worker and the router got a whole (fake) GPU bundle
    ours, _ = generate(Mixtral.from_pretrained(tmp_path / "ck"), [[5, 6, 7]], SamplingParams(max_tokens=4,
                                                                                          ignore_eos=True))
    assert r["tokens"] == ours[0]  # the same tokens as in-process
    # The bundles' GPUs are fake (no CUDA here): every actor saw that and runs its experts on the CPU, in fp32.
    assert (r["devices"], r["router_device"], r["dtypes"]) == (["cpu", "cpu"], "cpu", ["float32", "float32"])
    nodes = r["workers"] + [r["router"]]
    if strategy == "SPREAD":
        assert len(set(nodes)) == 3
    else:
        assert len(set(nodes)) == 1
