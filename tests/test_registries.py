"""The method registries (job kinds, synthesisers, distillers, SFDD strategies/defences/attacks): one style.

Each is a module that names its entries as "module:attr" and imports them only when asked; ``names()`` lists them
without importing a method, ``get(name)`` imports one, an unknown name is a SpecError listing the names, and
adding a method is one registration.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from dpdistill import distill, pipelines, synthesis
from dpdistill.distill import registry as distill_registry
from dpdistill.errors import SpecError
from dpdistill.federated import registry as federated_registry
from dpdistill.pipelines import registry as kinds
from dpdistill.synthesis import registry as synthesis_registry

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "dpdistill"
REGISTRIES = {
    "pipelines/registry.py": "dpdistill.pipelines",
    "synthesis/registry.py": "dpdistill.synthesis",
    "distill/registry.py": "dpdistill.distill",
    "federated/registry.py": "dpdistill.federated",
}


@pytest.mark.parametrize("path", sorted(REGISTRIES))
def test_a_registry_module_imports_nothing_from_its_package(path):
    tree = ast.parse((PACKAGE / path).read_text(encoding="utf-8"))
    package = REGISTRIES[path]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt)}  # annotations only, never run
    nodes = [node for node in ast.walk(tree) if id(node) not in typing_only]
    imported = [node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m == package or m.startswith(package + ".")], imported


def test_listing_names_and_loading_a_spec_import_no_method():
    # A fresh interpreter: the names come from the registries' tables, not from importing the methods.
    code = (
        "import json, sys\n"
        "from dpdistill import spec\n"
        "from dpdistill.distill import registry as d\n"
        "from dpdistill.synthesis import registry as s\n"
        "out = {'kinds': list(spec.JOB_KINDS), 'distill': d.names(), 'synthesis': s.names(),\n"
        "       'loaded': sorted(m for m in sys.modules if m.startswith(('dpdistill.pipelines.',\n"
        "                    'dpdistill.distill.', 'dpdistill.synthesis.', 'dpdistill.federated')))}\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(done.stdout)
    assert out["kinds"] == ["distill", "evaluate", "sfdd", "synthesize"]
    assert out["distill"] == ["dc", "dm", "dpgeng", "ndpdc", "psg"]
    assert out["synthesis"] == ["dp-gan", "dp-kernel", "dp-ldm", "dp-lora", "dp-mepf", "dp-merf", "dp-ntk", "dpdm", "gs-wgan", "pdp-diffusion"]
    assert out["loaded"] == ["dpdistill.distill.registry", "dpdistill.pipelines.registry",
                             "dpdistill.synthesis.base", "dpdistill.synthesis.registry"]


def test_spec_kinds_are_the_registered_kinds():
    from dpdistill.spec import JOB_KINDS, JobSpec

    assert JOB_KINDS == tuple(kinds.names())
    assert typing.get_args(JobSpec.model_fields["kind"].annotation) == JOB_KINDS
    for kind in kinds.names():
        cls = kinds.get(kind)
        assert cls.kind == kind and isinstance(pipelines.get_pipeline(kind), cls)


def test_every_registered_method_resolves_to_itself():
    for name in synthesis.names():
        cls = synthesis.get(name)
        assert cls.name == name and dataclasses.is_dataclass(cls.config_type)
        assert synthesis.get(name.upper()) is cls
    for name in distill.names():
        record = distill.get(name)
        assert record.name == name and record.run is getattr(sys.modules[record.run.__module__],
                                                             record.run.__name__)
        assert record.config is None or issubclass(record.config, BaseModel) or dataclasses.is_dataclass(
            record.config)
    assert {n for n in distill.names() if distill.get(n).private} == {"dpgeng", "ndpdc", "psg"}
    assert federated_registry.strategies.get("fedavg").__name__ == "FedAvg"
    assert federated_registry.defences.get("localdp").__name__ == "LocalDP"
    assert federated_registry.attacks.get("doorping").__name__ == "DoorpingClient"
    assert federated_registry.attacks.get("idlg") is federated_registry.attacks.get("dlg")


def test_sfdd_config_offers_exactly_the_registered_defences_and_attacks():
    from dpdistill.federated.config import SFDDConfig

    for field, table in (("defence", federated_registry.defences), ("attack", federated_registry.attacks)):
        assert set(typing.get_args(SFDDConfig.model_fields[field].annotation)) == set(table.choices()), field
        assert SFDDConfig.model_fields[field].default == "none"


@pytest.mark.parametrize(("lookup", "message"), [
    (lambda: kinds.get("audit"), "unknown job kind 'audit'; expected one of: distill, evaluate, sfdd, synthesize"),
    (lambda: synthesis.get("dp-nope"), "unknown synthesis method 'dp-nope'; expected one of: dp-gan, dp-kernel"),
    (lambda: distill.get("nope"), "unknown distillation method 'nope'; expected one of: dc, dm, dpgeng"),
    (lambda: federated_registry.defences.get("nope"), "unknown SFDD defence 'nope'; expected one of: ldpo-rld"),
    (lambda: federated_registry.attacks.get("none"), "unknown SFDD attack 'none'; expected one of: dlg, doorping"),
    (lambda: federated_registry.strategies.get("fedprox"), "unknown SFDD strategy 'fedprox'; expected one of: fed"),
])
def test_an_unknown_name_lists_the_known_ones(lookup, message):
    with pytest.raises(SpecError) as e:
        lookup()
    assert message in str(e.value)


class _ToyConfig(BaseModel):
    ipc: int = 1


def _run_toy(real, cfg, seed=0, **kwargs):  # noqa: ANN001, ANN003
    return (real, cfg, seed)


def test_a_new_method_is_one_registration(monkeypatch):
    monkeypatch.setattr(distill_registry, "_REGISTRY", dict(distill_registry._REGISTRY))
    monkeypatch.setattr(synthesis_registry, "_METHODS", dict(synthesis_registry._METHODS))
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    monkeypatch.setattr(federated_registry.defences, "_entries", dict(federated_registry.defences._entries))

    distill.register("toy", _run_toy, _ToyConfig, description="a toy")
    assert "toy" in distill.names() and distill.get("toy").make_config(ipc=3).ipc == 3
    with pytest.raises(ValueError, match="already registered"):
        distill.register("dm", _run_toy, _ToyConfig)
    distill_registry._REGISTRY.pop("dc", None)
    with pytest.raises(ValueError, match="registry names dpdistill.distill.dc:run_dc"):
        distill.register("dc", _ToyRun.run_dc, None)  # the table names another function for "dc"

    synthesis.register("toy-gen", "dpdistill.synthesis.dp_merf:DPMERF")
    with pytest.raises(ValueError, match="whose name is 'dp-merf'"):
        synthesis.get("toy-gen")  # a class must carry the name it is registered under
    with pytest.raises(ValueError, match="already registered"):
        synthesis.register("dp-merf", "dpdistill.synthesis.dp_ntk:DPNTK")

    kinds.register("toy-kind", "dpdistill.pipelines.distill_job:DistillPipeline")
    assert "toy-kind" in kinds.names() and kinds.get("toy-kind").kind == "distill"
    federated_registry.defences.register("toy-defence", "dpdistill.federated.defences:LocalDP")
    assert "toy-defence" in federated_registry.defences.choices()
    with pytest.raises(ValueError, match="other than 'none'"):
        federated_registry.defences.register("none", "dpdistill.federated.defences:LocalDP")


class _ToyRun:
    @staticmethod
    def run_dc(real, cfg, seed=0, **kwargs):  # noqa: ANN001, ANN003, ANN205
        return None
