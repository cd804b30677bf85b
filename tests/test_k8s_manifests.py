"""The manifests under k8s/ would run: the KubeRay resources validate strictly against KubeRay v1.7's CRD
schemas (unknown fields are errors, as `kubeconform -strict` would report them), every pod's claims, images,
shared memory, probes and resources are in place, the images are built from the lock file, and the data
volume has a way to be filled."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = Path(os.environ.get("DPDISTILL_SCHEMAS", ROOT.parent / "shared" / "schemas")) / "kuberay"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
RAY_MANIFESTS = ("raycluster.yaml", "rayjob-quickstart.yaml")

needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}")


def docs(manifest: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / manifest).read_text()) if d]


def doc_of_kind(manifest: str, kind: str) -> dict:
    (doc,) = [d for d in docs(manifest) if d["kind"] == kind]
    return doc


def ray_cluster_spec(manifest: str) -> dict:
    doc = next(d for d in docs(manifest) if d["apiVersion"] == "ray.io/v1")
    return doc["spec"].get("rayClusterSpec", doc["spec"])


def ray_groups(manifest: str) -> list[tuple[str, dict]]:
    """(group name, group spec) of the head and every worker group of a Ray manifest."""
    spec = ray_cluster_spec(manifest)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def pod_specs() -> list[tuple[str, str, dict]]:
    """(manifest, owner, pod spec) of every pod any manifest would create."""
    out = []
    for manifest in MANIFESTS:
        for doc in docs(manifest):
            if doc["kind"] in ("Deployment", "Job"):
                out.append((manifest, doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
        if manifest in RAY_MANIFESTS:
            out += [(manifest, name, group["template"]["spec"]) for name, group in ray_groups(manifest)]
    return out


def _strict(node):
    """Forbid unknown keys on every object node that lists its properties and does not preserve unknowns."""
    if isinstance(node, dict):
        if (node.get("type") == "object" and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node.setdefault("additionalProperties", False)
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


def _schema(crd_file: str) -> dict:
    crd = yaml.load((SCHEMAS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {"RayCluster": _schema("ray.io_rayclusters.yaml"), "RayJob": _schema("ray.io_rayjobs.yaml")}


@needs_schemas
@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_manifest_validates_strictly(schemas, manifest):
    ray_docs = [d for d in docs(manifest) if d["apiVersion"] == "ray.io/v1"]
    assert len(ray_docs) == 1
    doc = ray_docs[0]
    jsonschema.validate({k: v for k, v in doc.items() if k != "metadata"} | {"metadata": {}},
                        schemas[doc["kind"]])


@needs_schemas
def test_strict_schema_catches_a_typo(schemas):
    doc = doc_of_kind("raycluster.yaml", "RayCluster")
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(doc, schemas["RayCluster"])


def test_every_document_is_a_known_kind():
    """No core schema ships here; at least every document is one of the kinds we mean, with a name."""
    known = {("v1", "PersistentVolumeClaim"), ("v1", "Service"), ("apps/v1", "Deployment"), ("batch/v1", "Job"),
             ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}
    for manifest in MANIFESTS:
        for doc in docs(manifest):
            assert (doc["apiVersion"], doc["kind"]) in known, (manifest, doc["kind"])
            assert doc["metadata"]["name"].startswith("dpdistill")


def test_token_auth_is_not_switched_off():
    for manifest in RAY_MANIFESTS:
        assert ray_cluster_spec(manifest)["authOptions"]["mode"] == "token"
        for _, group in ray_groups(manifest):
            for c in group["template"]["spec"]["containers"]:
                assert all(e["name"] != "RAY_AUTH_MODE" for e in c.get("env", [])), "KubeRay sets it"


def test_autoscaling_is_on_where_groups_can_grow():
    """maxReplicas does nothing without the autoscaler (the old RayJob cluster had none)."""
    for manifest in RAY_MANIFESTS:
        spec = ray_cluster_spec(manifest)
        assert spec["enableInTreeAutoscaling"] is True, manifest
        assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])


def test_ray_pods_have_memory_backed_shm():
    for manifest in RAY_MANIFESTS:
        for name, group in ray_groups(manifest):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", (manifest, name)


def test_a_head_without_cpus_gets_its_driver_placed_on_a_worker():
    """With num-cpus 0 on the head, the RayJob's driver must ask for a CPU, or it runs on the head pod."""
    job = doc_of_kind("rayjob-quickstart.yaml", "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    if head["rayStartParams"].get("num-cpus") == "0":
        assert job["spec"]["entrypointNumCpus"] >= 1


def test_every_container_has_resources_and_every_service_pod_probes():
    for manifest, owner, pod in pod_specs():
        for c in pod["containers"]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (manifest, owner, c["name"])
    for manifest in ("mlflow.yaml", "postgres.yaml"):
        deployment = doc_of_kind(manifest, "Deployment")
        # One replica on a ReadWriteOnce claim: the old pod must release it before the new one mounts it.
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"] and c["livenessProbe"], manifest


def test_every_claim_a_pod_mounts_is_defined_and_the_ray_claims_live_with_the_ray_cluster():
    defined = {d["metadata"]["name"]: (m, d) for m in MANIFESTS for d in docs(m)
               if d["kind"] == "PersistentVolumeClaim"}
    for manifest, owner, pod in pod_specs():
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in defined, (manifest, owner)
    for claim in ("dpdistill-runs", "dpdistill-data"):
        manifest, pvc = defined[claim]
        assert manifest == "raycluster.yaml"
        # Every Ray pod (on any node) mounts them; the labels let `kubectl apply -l` create just the claims.
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == "storage"
    assert not [d for d in docs("mlflow.yaml") if d["kind"] == "PersistentVolumeClaim"
                and d["metadata"]["name"] in ("dpdistill-runs", "dpdistill-data")]


def test_the_data_volume_can_be_filled():
    """The old dpdistill-data was ReadOnlyMany and nothing could write it: a Job now mounts it read-write."""
    writers = []
    for manifest, owner, pod in pod_specs():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                if claims.get(m["name"]) == "dpdistill-data" and not m.get("readOnly"):
                    writers.append((manifest, owner, c))
    assert [(m, o) for m, o, _ in writers] == [("data-load.yaml", "dpdistill-data-load")]


def test_the_data_load_command_runs(tmp_path):
    """The Job's command, run here as written: its dataset names replaced by the embedded `digits` (no
    download possible here), plus the real MNIST when the workshop's copy is present."""
    (_, _, pod) = next(p for p in pod_specs() if p[1] == "dpdistill-data-load")
    (c,) = pod["containers"]
    from dpdistill import data

    names = c["args"][2:]
    assert names and set(names) <= set(data.names())
    shared = ROOT.parent / "shared" / "data"
    local = ["digits"] + (["mnist"] if (shared / "MNIST" / "raw").is_dir() else [])
    env = dict(os.environ, DPDISTILL_DATA=str(shared if shared.is_dir() else tmp_path))
    assert {e["name"]: e["value"] for e in c["env"]}["DPDISTILL_DATA"] == "/data"
    proc = subprocess.run([sys.executable, *c["args"][:2], *local], capture_output=True, text=True, env=env,
                          timeout=300)
    assert c["command"] == ["python"] and proc.returncode == 0, proc.stderr[-2000:]
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == local


# --- images ---------------------------------------------------------------------------------------------------

def built_images() -> dict[str, Path]:
    """Image tag -> the Dockerfile whose header builds it (`docker build -f k8s/X -t TAG .`)."""
    out = {}
    for dockerfile in K8S.glob("Dockerfile*"):
        for tag in re.findall(rf"docker build -f k8s/{re.escape(dockerfile.name)} -t (\S+) \.",
                              dockerfile.read_text()):
            out[tag] = dockerfile
    return out


def test_every_dpdistill_image_is_built_by_a_dockerfile_at_the_package_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = built_images()
    assert set(built) == {f"dpdistill:{version}", f"dpdistill:{version}-cuda"}
    used = {c["image"] for _, _, pod in pod_specs() for c in pod["containers"]}
    assert {i for i in used if i.startswith("dpdistill")} == set(built)
    gpu = [g for _, g in ray_groups("raycluster.yaml") if "nvidia.com/gpu" in
           g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["template"]["spec"]["containers"][0]["image"].endswith("-cuda") for g in gpu)


def test_each_tag_is_built_by_its_own_dockerfile_on_the_locked_ray_base():
    """dpdistill:V from k8s/Dockerfile on Ray's CPU image, dpdistill:V-cuda from k8s/Dockerfile.cuda on its GPU
    image, both at the Ray version of the lock (the manifests' Ray pods run that Ray)."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = built_images()
    assert built[f"dpdistill:{version}"].name == "Dockerfile"
    assert built[f"dpdistill:{version}-cuda"].name == "Dockerfile.cuda"
    ray = _lock()["ray"]
    for tag, base in ((f"dpdistill:{version}", f"rayproject/ray:{ray}-py311"),
                      (f"dpdistill:{version}-cuda", f"rayproject/ray:{ray}-py311-gpu")):
        (from_,) = re.findall(r"^FROM (\S+)", built[tag].read_text(), flags=re.M)
        assert from_ == base, tag
    # Every dpdistill tag named anywhere under k8s/ (manifests and the comments that document them) is built.
    named = {m for p in K8S.iterdir() if p.is_file()
             for m in re.findall(r"\bdpdistill:\d[\w.-]*\w", p.read_text())}
    assert named == set(built)


def test_the_cuda_image_runs_exactly_where_a_gpu_is_requested():
    """A GPU pod without the CUDA image has no CUDA torch (device: cuda is refused there); a CPU pod with it
    pulls gigabytes of CUDA libraries it never uses."""
    for manifest in RAY_MANIFESTS:
        for name, group in ray_groups(manifest):
            (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
            resources = container.get("resources", {})
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            assert container["image"].endswith("-cuda") == (gpus is not None), (manifest, name)
            if gpus is not None:  # extended resources: the request must equal the limit
                assert resources.get("requests", {}).get("nvidia.com/gpu") == gpus, (manifest, name)


def test_images_install_exactly_the_lock():
    for tag, dockerfile in built_images().items():
        text = dockerfile.read_text()
        assert "COPY --chown=ray:users k8s/requirements.lock" in text, tag
        assert re.search(r"pip install --no-cache-dir --no-deps -r /tmp/requirements(-cpu)?\.lock", text), tag
        assert "pip install --no-cache-dir --no-deps ." in text, tag
        # The RayJob runs /app/jobs/...: the image's WORKDIR holds the job specs.
        assert "WORKDIR /app" in text and "COPY --chown=ray:users jobs ./jobs" in text


def _lock() -> dict[str, str]:
    pins = {}
    for line in (K8S / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_satisfies_the_package_requirements():
    """Every dependency of dpdistill (with ray's extras, transitively) is pinned at a version it accepts."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {canonicalize_name(k): v for k, v in _lock().items()}
    todo = [(Requirement(r), None) for r in md.requires("dpdistill") or []]
    seen = set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra or ""}):
            continue
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        assert name in pins, f"{req} is not in k8s/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs locked {pins[name]}"
        for sub in md.requires(req.name) or []:
            sub_req = Requirement(sub)
            for e in (None, *req.extras):
                todo.append((sub_req, e))
    assert "psycopg2-binary" in pins  # the MLflow server's PostgreSQL driver


def test_cpu_image_drops_only_what_torch_alone_needs():
    """k8s/Dockerfile leaves out torch's CUDA libraries: nothing else installed may depend on them."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pattern = re.search(r"grep -v -E '(\S+)' /tmp/requirements\.lock", (K8S / "Dockerfile").read_text()).group(1)
    dropped = {n for n in _lock() if re.match(pattern, f"{n}==")}
    assert {"torch", "torchvision", "triton"} <= dropped and any(n.startswith("nvidia-") for n in dropped)
    cuda_only = {canonicalize_name(n) for n in dropped} - {"torch", "torchvision"}
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in cuda_only or name in ("torch", "torchvision"):
            continue
        for r in dist.requires or []:
            assert canonicalize_name(Requirement(r).name) not in cuda_only, f"{name} needs {r}"


# --- MLflow ---------------------------------------------------------------------------------------------------

def mlflow_args() -> dict[str, str]:
    (c,) = doc_of_kind("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow", "server"]
    return dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), "") for a in c["args"])


def test_mlflow_accepts_the_host_every_ray_pod_sends():
    """MLflow 3.17 answers 403 to a Host outside --allowed-hosts; its default does not include service names."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    allowed = mlflow_args()["allowed-hosts"].split(",")
    hosts = set()
    for manifest in RAY_MANIFESTS:
        for _, group in ray_groups(manifest):
            for e in group["template"]["spec"]["containers"][0]["env"]:
                if e["name"] == "MLFLOW_TRACKING_URI":
                    hosts.add(urlparse(e["value"]).netloc)
    assert hosts == {"dpdistill-mlflow:5000"}
    service = doc_of_kind("mlflow.yaml", "Service")
    assert service["metadata"]["name"] == "dpdistill-mlflow" and service["spec"]["ports"][0]["port"] == 5000
    for host in (*hosts, "dpdistill-mlflow.default.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
        if host != "localhost:5000":
            assert not is_allowed_host_header(get_default_allowed_hosts(), host)  # why the flag is needed
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_mlflow_stores_runs_in_postgres_and_artifacts_on_its_claim():
    args = mlflow_args()
    store = urlparse(args["backend-store-uri"])
    assert store.scheme == "postgresql" and store.hostname == doc_of_kind("postgres.yaml", "Service")["metadata"]["name"]
    (c,) = doc_of_kind("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    password = next(e for e in c["env"] if f"$({e['name']})" == store.password)
    (pg,) = doc_of_kind("postgres.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    pg_password = next(e for e in pg["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"] == pg_password["valueFrom"]  # one Secret for both
    pg_env = {e["name"]: e.get("value") for e in pg["env"]}
    assert (store.username, store.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    assert "serve-artifacts" in args and args["default-artifact-root"] == "mlflow-artifacts:/"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert args["artifacts-destination"] in mounts


def test_the_rayjob_stop_grace_is_the_one_dpdistill_submit_uses():
    """A stopped driver needs time to write its interrupted run folder; the manifest's runtime env and `dpdistill
    submit` give the same grace (jobs.STOP_GRACE_SECONDS), so changing one without the other fails here."""
    from dpdistill.runtime.jobs import STOP_GRACE_SECONDS

    job = doc_of_kind("rayjob-quickstart.yaml", "RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(STOP_GRACE_SECONDS)
