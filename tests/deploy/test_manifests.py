"""deploy/ as a user applies it: every YAML parses; the KubeRay RayJob has what KubeRay needs and an entrypoint that
`expertmesh serve`'s own parser accepts; Secret, volume, Service, image and README steps agree across files; the
Dockerfile installs dependencies before the source, runs as non-root and builds a CPU or a CUDA variant; promtool
accepts the Prometheus config."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from cluster.cli import build_parser
from cluster.rebalance_flags import settings_from_args
from cluster.serve_cmd import DEFAULT_FILE_SD

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
IMAGE = "REGISTRY/expertmesh:VERSION"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    found = [d for d in docs(path) if d["kind"] == kind]
    assert len(found) == 1, f"{path.name}: {len(found)} {kind} documents"
    return found[0]


def ray_pin() -> str:
    return next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray==")).split("==")[1]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["containers"] + pod_spec.get("initContainers", [])


def groups(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def serve_args(job: dict):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["expertmesh", "serve"], argv
    return argv, build_parser().parse_args(argv[1:])  # SystemExit (a failed test) on a flag serve does not know


def test_every_yaml_under_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "kuberay/rayjob.yaml", "kuberay/models-volume.yaml", "kuberay/prometheus-operator.yaml",
        "prometheus/prometheus.yml"}
    for f in files:
        parsed = docs(f)
        assert parsed and all(isinstance(d, dict) for d in parsed), f


def test_rayjob_has_what_kuberay_needs():
    job = one(KUBERAY / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    # a long-running server: no deadline; retried on a new cluster when it fails; the cluster goes when it ends
    assert "activeDeadlineSeconds" not in spec and spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["rayVersion"] == ray_pin()
    head, *workers = groups(job)
    assert len(workers) == 1 and workers[0]["groupName"] == "experts"
    for g in groups(job):
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())  # KubeRay: map[string]string
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
        pod = g["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert named_ports(c)["metrics"] == 8080
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_ports = named_ports(head["template"]["spec"]["containers"][0])
    assert {"gcs": 6379, "dashboard": 8265, "client": 10001}.items() <= head_ports.items()
    # autoscaling: the autoscaler adds expert pods for pending placement groups
    assert cluster["enableInTreeAutoscaling"] is True
    w = workers[0]
    assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]


def test_entrypoint_is_a_serve_command_line_pinned_to_the_head():
    job = one(KUBERAY / "rayjob.yaml", "RayJob")
    argv, args = serve_args(job)
    head, experts = groups(job)
    assert args.address == "auto" and args.host == "0.0.0.0"
    assert named_ports(head["template"]["spec"]["containers"][0])["http"] == args.port
    # the router's bundle takes the head's custom resource: the router (and its port) is in the head pod
    head_resources = json.loads(head["rayStartParams"]["resources"].strip("'\"` "))
    assert head_resources == {args.router_resource: 1}
    assert "resources" not in experts["rayStartParams"]
    # the start-up workers' pods exist before serve starts; the autoscaler adds pods for the workers serve adds
    assert args.autoscale and experts["minReplicas"] == experts["replicas"] == args.workers == args.min_workers
    assert experts["maxReplicas"] == args.max_workers > args.workers
    settings_from_args(args, num_experts=8)  # what serve checks before starting (Mixtral-8x7B: 8 experts)
    assert not any(a.startswith("--api-key") for a in argv)  # the key comes from the Secret, never argv
    mount = next(m for m in head["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert Path(args.model).is_relative_to(mount["mountPath"])


def test_secret_volume_service_and_image_agree():
    job = one(KUBERAY / "rayjob.yaml", "RayJob")
    head, experts = groups(job)
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    secret = env["EXPERTMESH_API_KEY"]["valueFrom"]["secretKeyRef"]
    readme = (ROOT / "README.md").read_text()
    # from a file: the key is never in kubectl's argv (nor in the shell history)
    assert f"kubectl create secret generic {secret['name']} --from-file={secret['key']}=" in readme
    assert "--from-literal" not in readme
    # the volume: a ReadOnlyMany claim, mounted read-only in every pod
    claim = one(KUBERAY / "models-volume.yaml", "PersistentVolumeClaim")
    volume = one(KUBERAY / "models-volume.yaml", "PersistentVolume")
    assert claim["spec"]["accessModes"] == volume["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    for g in (head, experts):
        pod = g["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v["name"] == "models")
        assert vol["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        assert all(m["readOnly"] for c in containers(pod) for m in c["volumeMounts"] if m["name"] == "models")
        assert {c["image"] for c in containers(pod)} == {IMAGE}  # a placeholder the README's sed replaces
    # the Service selects the head pod (where the router is), not the expert pods, on the head's http port
    svc = one(KUBERAY / "rayjob.yaml", "Service")
    selector = svc["spec"]["selector"].items()
    assert selector <= head["template"]["metadata"]["labels"].items()
    assert not selector <= experts["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == serve_args(job)[1].port
    # Prometheus Operator kinds only in their own optional file; its http_sd goes through that Service + Secret
    for f in ("rayjob.yaml", "models-volume.yaml"):
        assert not [d for d in docs(KUBERAY / f) if d["apiVersion"].startswith("monitoring.coreos.com")]
    scrape = one(KUBERAY / "prometheus-operator.yaml", "ScrapeConfig")
    (sd,) = scrape["spec"]["httpSDConfigs"]
    assert sd["url"].startswith(f"http://{svc['metadata']['name']}.") and sd["url"].endswith(
        f":{port['port']}/v1/admin/prometheus_targets")
    assert sd["authorization"]["credentials"] == {"name": secret["name"], "key": secret["key"]}
    assert one(KUBERAY / "prometheus-operator.yaml", "PodMonitor")["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics"}]


def test_readme_kubernetes_steps_use_these_files():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on Kubernetes", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"deploy/[\w./-]+[\w]", section)):
        assert (ROOT / path).exists(), path
    assert f'sed "s|{IMAGE}|$IMAGE|" deploy/kuberay/rayjob.yaml | kubectl apply -f -' in section
    assert "docker build -f deploy/Dockerfile" in section and "kubectl port-forward svc/expertmesh-openai" in section
    volume = (KUBERAY / "models-volume.yaml").read_text()
    assert "NFS_SERVER" in volume and 's|NFS_SERVER|' in section
    # the stated KubeRay minimum: RayJob.spec.backoffLimit came with KubeRay 1.2
    assert "backoffLimit" in one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    (minimum,) = re.findall(r"KubeRay\S*\s+operator >= (\d+)\.(\d+)", section)
    assert tuple(map(int, minimum)) >= (1, 2)
    assert "schema" not in section  # no claim of a schema check that no test does


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_dockerfile_layers_user_and_variants():
    ins = dockerfile_instructions()
    assert ins[0][0] == "FROM"
    copy_deps = next(i for i, (k, a) in enumerate(ins) if k == "COPY" and "pyproject.toml" in a)
    install_deps = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and "pip install -r" in a)
    sources = [i for i, (k, a) in enumerate(ins) if k == "COPY" and a.split()[0] in
               ("protos", "model", "workers", "router", "cluster", "bench")]
    assert len(sources) == 6 and copy_deps < install_deps < min(sources)
    assert "README.md" not in ins[copy_deps][1]  # a README change must not reinstall the dependencies
    install_pkg = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and "pip install --no-deps ." in a)
    assert install_pkg > max(sources)
    # variants: ARG VARIANT (default cuda); cpu takes torch's CPU wheel index; anything else fails the build
    assert ("ARG", "VARIANT=cuda") in ins
    run = ins[install_deps][1]
    assert 'cpu) pip install --index-url "$TORCH_CPU_INDEX"' in run and "cuda) pip install" in run
    assert "exit 2" in run
    # wget: older KubeRay probes run `wget ... | grep success`; installed lean, without the apt lists
    apt = next(a for k, a in ins if k == "RUN" and "apt-get install" in a)
    assert re.search(r"apt-get install -y --no-install-recommends( \S+)* wget\b", apt), apt
    assert apt.startswith("apt-get update") and "rm -rf /var/lib/apt/lists/*" in apt
    assert ins.index(("RUN", apt)) < max(i for i, (k, _) in enumerate(ins) if k == "USER")  # as root
    # runs as a non-root user from after the last RUN on
    users = [i for i, (k, _) in enumerate(ins) if k == "USER"]
    assert users and users[-1] > max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    assert ins[users[-1]][1] not in ("0", "root") and ins[users[-1]][1].split(":")[0] != "0"
    # the build context lets in what the COPYs need
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for i in [copy_deps, *sources, next(i for i, (k, a) in enumerate(ins) if k == "COPY" and a == "README.md ./")]:
        for src in ins[i][1].split()[:-1]:
            assert f"!{src}" in ignore, src


def test_image_requirements_come_from_pyproject():
    """The exact lists the Dockerfile installs: torch alone (variant index), then the rest with ray[default]."""
    cluster_extra = PYPROJECT["project"]["optional-dependencies"]["cluster"]
    assert cluster_extra == [f"ray[default]=={ray_pin()}"]
    script = DEPLOY / "pyproject_requirements.py"

    def reqs(which: str) -> list[str]:
        out = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), which],
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    deps = PYPROJECT["project"]["dependencies"]
    torch = [r for r in deps if re.match(r"torch\b", r)]
    assert reqs("torch") == torch and torch[0].startswith("torch==")
    assert reqs("rest") == [r for r in deps if r not in torch] + cluster_extra
    bad = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "gpu"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "torch|rest" in bad.stderr


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian: apt-get install -y prometheus)")
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [str(DEFAULT_FILE_SD)]  # where serve writes by default
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith("/v1/admin/prometheus_targets") and sd["authorization"]["type"] == "Bearer"
