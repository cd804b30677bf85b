"""Malformed specs: each prints one line naming the file/field and what was expected, exits 2, and leaves no
run folder behind. Runs the real CLI entry point in-process (and once as a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpdistill.cli import main

GOOD = {
    "name": "t",
    "kind": "distill",
    "data": {"name": "digits"},
    "method": {"name": "dm", "ipc": 1, "iterations": 1},
    "evaluation": {"seeds": 1, "epochs": 1},
    "tracking": {"enabled": False},
}

# A private DP-GenG job on digits (its nested generator block is what the cases vary).
DPGENG = {
    "name": "g",
    "kind": "distill",
    "data": {"name": "digits"},
    "privacy": {"epsilon": 5.0},
    "method": {"name": "dpgeng", "ipc": 1, "factor": 1, "generator": "dp-merf",
               "generator_options": {"iterations": 2, "num_features": 100}, "generated_per_class": 4,
               "extractors": 1, "extractor_epochs": 0, "expert_pretrain_epochs": 0, "iterations": 1},
    "evaluation": {"seeds": 1, "epochs": 1},
    "tracking": {"enabled": False},
}


def _write(tmp_path: Path, doc) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def _merge(base: dict, patch: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is None and k in out:
            out.pop(k)
        else:
            out[k] = v
    return out


def _run_cli(capsys, args: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return exc.value.code, err


# (id, spec document or raw text, extra CLI args, substrings the one-line error must contain)
CASES = [
    ("yaml-syntax", "name: t\nkind: [distill\n", [], ["spec.yaml:", "YAML syntax error"]),
    ("empty-file", "", [], ["empty spec"]),
    ("top-level-list", "- a\n- b\n", [], ["expected a mapping at the top level"]),
    ("unknown-top-key", _merge(GOOD, {"epochs": 3}), [], ["unknown key 'epochs'", "expected one of:"]),
    ("unknown-nested-key", _merge(GOOD, {"data": {"nmae": "digits"}}), [], ["unknown key 'data.nmae'", "name"]),
    ("missing-name", _merge(GOOD, {"name": None}), [], ["missing required field 'name'"]),
    ("missing-method", _merge(GOOD, {"method": None}), [], ["missing required field 'method'"]),
    ("bad-kind", _merge(GOOD, {"kind": "distil"}), [], ["field 'kind'", "distill"]),
    ("seed-wrong-type", _merge(GOOD, {"seed": "abc"}), [], ["field 'seed'", "integer", "'abc'"]),
    ("seeds-out-of-range", _merge(GOOD, {"evaluation": {"seeds": 0}}), [],
     ["field 'evaluation.seeds'", "greater than or equal to 1"]),
    ("epsilon-negative", _merge(GOOD, {"privacy": {"epsilon": -1}}), [], ["field 'privacy.epsilon'", "greater than 0"]),
    ("delta-too-big", _merge(GOOD, {"privacy": {"delta": 1.5}}), [], ["field 'privacy.delta'", "less than 1"]),
    ("bad-job-name", _merge(GOOD, {"name": "a b/c"}), [], ["field 'name'", "run folder"]),
    ("bad-device", _merge(GOOD, {"device": "gpu"}), [], ["field 'device'", "cpu, cuda"]),
    ("unknown-method", _merge(GOOD, {"method": {"name": "dmx"}}), [], ["method.name", "unknown distillation method 'dmx'", "dm"]),
    ("unknown-method-option", _merge(GOOD, {"method": {"ipcc": 3}}), [], ["unknown key 'method.ipcc'", "ipc"]),
    ("method-option-type", _merge(GOOD, {"method": {"ipc": "ten"}}), [], ["method.ipc", "'ten'"]),
    ("unknown-dataset", _merge(GOOD, {"data": {"name": "mnits"}}), [], ["unknown dataset 'mnits'", "mnist"]),
    ("unknown-eval-model", _merge(GOOD, {"evaluation": {"model": "vgg99"}}), [], ["evaluation.model", "vgg99"]),
    ("unknown-eval-augment", _merge(GOOD, {"evaluation": {"augment": "flip"}}), [],
     ["field 'evaluation.augment'", "'dsa-lite' or 'dsa'", "'flip'"]),
    ("set-without-equals", GOOD, ["--set", "method.ipc"], ["--set 'method.ipc'", "KEY=VALUE"]),
    ("set-bad-value", GOOD, ["--set", "evaluation.epochs=-4"], ["field 'evaluation.epochs'", "-4"]),
    # A check across method fields names the block, not "method." with an empty field, and does not echo it.
    ("method-cross-field-check", _merge(GOOD, {"method": {"ipc": 3, "factor": 2}}), [],
     ["field 'method':", "multiple of factor^2"]),
    ("non-private-with-epsilon", _merge(GOOD, {"privacy": {"epsilon": 1.0}}), [], ["privacy.epsilon", "no privacy guarantee"]),
    # Strict scalars: lax pydantic read a boolean as 1 and a quoted number as a number.
    ("method-option-bool-for-int", GOOD, ["--set", "method.ipc=true"], ["field 'method.ipc'", "not a boolean"]),
    ("job-field-bool-for-int", GOOD, ["--set", "evaluation.seeds=true"], ["field 'evaluation.seeds'", "not a boolean"]),
    ("job-field-string-for-int", GOOD, ["--set", "evaluation.epochs='3'"], ["field 'evaluation.epochs'", "not a string"]),
    # Nested option blocks, each refused before anything is written (they used to fail after the release).
    ("model-options-unknown", GOOD, ["--set", "evaluation.model_options.bogus=1"],
     ["unknown key 'evaluation.model_options.bogus'", "width"]),
    ("model-options-bool", GOOD, ["--set", "evaluation.model_options.width=true"],
     ["field 'evaluation.model_options.width'", "not a boolean"]),
    ("model-options-value", GOOD, ["--set", "evaluation.model_options.width=0"],  # the factory's own check
     ["evaluation.model_options", "'width' must be a positive integer"]),
    ("generator-unknown", DPGENG, ["--set", "method.generator=dp-merff"],
     ["field 'method.generator'", "unknown synthesis method 'dp-merff'", "dp-merf"]),
    ("generator-options-unknown", DPGENG, ["--set", "method.generator_options.bogus=1"],
     ["unknown key 'method.generator_options.bogus'", "num_features"]),
    ("generator-options-bool", DPGENG, ["--set", "method.generator_options.iterations=true"],
     ["field 'method.generator_options.iterations'", "not a boolean"]),
    ("generator-options-value", DPGENG, ["--set", "method.generator_options.num_features=0"],  # its constructor's
     ["method.generator_options", "'num_features' must be > 0"]),
]


@pytest.mark.parametrize("case_id,doc,extra,needles", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_one_line_exit_2_no_run_folder(tmp_path, capsys, case_id, doc, extra, needles):
    spec = _write(tmp_path, doc)
    runs = tmp_path / "runs"
    code, err = _run_cli(capsys, ["run", str(spec), "--runs-dir", str(runs), *extra])
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not runs.exists() or not any(runs.rglob("spec.yaml")), "a run folder was left behind"


def test_missing_spec_file(tmp_path, capsys):
    code, err = _run_cli(capsys, ["run", str(tmp_path / "nope.yaml"), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert err.strip() == f"dpdistill: error: {tmp_path / 'nope.yaml'}: spec file not found"
    assert not (tmp_path / "runs").exists()


def test_dataset_folder_missing(tmp_path, capsys):
    spec = _write(tmp_path, _merge(GOOD, {"data": {"name": "mnist", "root": str(tmp_path / "empty")}}))
    code, err = _run_cli(capsys, ["run", str(spec), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "mnist" in err and str(tmp_path / "empty") in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "runs").exists()


def test_delta_at_least_one_over_n_is_refused(tmp_path, capsys):
    # digits has 1437 training records here: delta = 0.01 >= 1/n must be refused before anything runs.
    doc = _merge(GOOD, {"privacy": {"epsilon": 1.0, "delta": 0.01}})
    spec = _write(tmp_path, doc)
    from dpdistill.errors import DpdistillError
    from dpdistill.runner import make_ledger
    from dpdistill.spec import load_spec

    job = load_spec(spec)
    with pytest.raises(DpdistillError, match=r"delta"):
        make_ledger(job, None, 1437)


def test_real_subprocess_exit_code_and_single_line(tmp_path):
    spec = _write(tmp_path, _merge(GOOD, {"evaluation": {"seeds": "many"}}))
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "dpdistill.cli", "run", str(spec), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "evaluation.seeds" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("block,patch,needle", [
    ("evaluation.model_options", lambda s: setattr(s.evaluation, "model_options", {"bogus": 1}),
     "unknown key 'evaluation.model_options.bogus'"),
    ("evaluation.model_options value", lambda s: setattr(s.evaluation, "model_options", {"depth": 0}),
     "'depth' must be a positive integer"),
    ("method (bool for int)", lambda s: setattr(s, "method", type(s.method)(**{**s.method.model_dump(), "ipc": True})),
     "field 'method.ipc': expected an integer, not a boolean"),
    ("method.generator", lambda s: setattr(s, "method", type(s.method)(**{**s.method.model_dump(), "generator": "x"})),
     "unknown synthesis method 'x'"),
    ("method.generator_options", lambda s: setattr(s, "method", type(s.method)(
        **{**s.method.model_dump(), "generator_options": {"bogus": 1}})), "'method.generator_options.bogus'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_run_job_refuses_nested_options_of_a_spec_built_in_code(tmp_path, block, patch, needle):
    """run_job itself (sweeps, Ray Jobs, library users) re-checks every nested block before the run folder
    exists and before any charge: a spec changed after load_spec skipped those checks."""
    from dpdistill.errors import SpecError
    from dpdistill.runner import run_job
    from dpdistill.spec import load_spec

    spec = load_spec(_write(tmp_path, DPGENG))
    patch(spec)
    runs = tmp_path / "runs"
    with pytest.raises(SpecError) as err:
        run_job(spec, runs, progress=False)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not runs.exists(), "a run folder (or budget store) was written"
