"""The KubeRay manifests under k8s/ validate against KubeRay v1.7's CRD schemas, strictly (unknown fields
are errors, as `kubeconform -strict` would report them)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(os.environ.get("DPDISTILL_SCHEMAS", ROOT.parent / "shared" / "schemas")) / "kuberay"

pytestmark = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}")


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


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob-quickstart.yaml"])
def test_manifest_validates_strictly(schemas, manifest):
    doc = yaml.safe_load((ROOT / "k8s" / manifest).read_text())
    jsonschema.validate({k: v for k, v in doc.items() if k != "metadata"} | {"metadata": {}},
                        schemas[doc["kind"]])
    assert doc["apiVersion"] == "ray.io/v1"


def test_strict_schema_catches_a_typo(schemas):
    doc = yaml.safe_load((ROOT / "k8s" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(doc, schemas["RayCluster"])


def test_token_auth_is_not_switched_off():
    for manifest in ("raycluster.yaml", "rayjob-quickstart.yaml"):
        doc = yaml.safe_load((ROOT / "k8s" / manifest).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["authOptions"]["mode"] == "token"


def test_quickstart_rayjob_runs_a_real_job_spec():
    doc = yaml.safe_load((ROOT / "k8s" / "rayjob-quickstart.yaml").read_text())
    entry = doc["spec"]["entrypoint"].split()
    assert entry[:2] == ["dpdistill", "run"]
    assert (ROOT / "jobs" / Path(entry[2]).name).is_file()
