"""`--router-resource` (KubeRay's head offers `expertmesh_router: 1`): on a simulated 2-node cluster (fake GPUs) the
router lands on the node offering the resource and keeps its GPU there: with the RayJob's SPREAD its group is
placed before the workers', one of which would otherwise take that GPU first and leave the router unplaceable. A
resource no node offers is a clear error. In a subprocess: the test session already owns a Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from model.random_checkpoint import write_checkpoint

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from cluster.deployment import ClusterConfig, ExpertCluster
    from cluster.placement import PlacementError

    model_dir = sys.argv[1]
    # as on KubeRay: the head offers the router resource and one GPU, the expert node the other GPUs
    sim = Cluster(initialize_head=True,
                  head_node_args={"num_cpus": 2, "num_gpus": 1, "resources": {"expertmesh_router": 1}})
    pinned = sim.head_node
    gpus = sim.add_node(num_cpus=3, num_gpus=2)
    sim.wait_for_nodes()
    ray.init(address=sim.address, include_dashboard=False, log_to_driver=False)
    try:
        ExpertCluster(ClusterConfig(model_dir, 2, router_resource="no_such_resource"))
        error = None
    except PlacementError as e:
        error = str(e)
    with ExpertCluster(ClusterConfig(model_dir, 2, pg_strategy="SPREAD", router_resource="expertmesh_router")) as c:
        router = ray.get(c.router.info.remote())["node_id"]
        workers = [i["node_id"] for i in c.worker_infos()]
    ray.shutdown()
    sim.shutdown()
    print("RESULT " + json.dumps({"router": router, "workers": workers, "pinned": pinned.node_id,
                                  "gpus": gpus.node_id, "error": error}))
""")


def test_router_lands_on_the_node_with_the_router_resource(tmp_path):
    write_checkpoint(tmp_path / "ck", "tiny", seed=4)
    script = tmp_path / "pinning.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ck")], capture_output=True, text=True,
                          timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[0][len("RESULT "):])
    assert r["router"] == r["pinned"]
    assert r["workers"] == [r["gpus"], r["gpus"]]  # the other GPUs: the router's was taken first
    assert r["error"].startswith("--router-resource no_such_resource: no node of the Ray cluster offers it")
