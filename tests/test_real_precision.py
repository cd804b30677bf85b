"""``method.real_precision: bfloat16`` reaches the real-side forward of every matcher that offers it (DM, NDPDC,
DP-GenG's per-iteration matching), and float32 (the default) never converts a network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dpdistill.distill import embedding
from dpdistill.runner import run_job
from dpdistill.spec import validate_spec

OPTIONS: dict[str, dict[str, Any]] = {
    "dm": {"ipc": 1, "iterations": 3, "batch_real": 16, "net_width": 8, "net_depth": 2},
    "ndpdc": {"ipc": 1, "iterations": 3, "batch_real": 16, "net_width": 8, "net_depth": 2,
              "matching": "per-iteration"},
    "dpgeng": {"ipc": 1, "factor": 1, "generated_per_class": 20, "extractors": 2, "extractor_epochs": 1,
               "net_width": 8, "net_depth": 2, "expert_pretrain_epochs": 0, "expert_dp_epochs": 0,
               "iterations": 3, "batch_real": 16, "matching": "per-iteration", "sigma": 1.0,
               "generator_options": {"iterations": 5, "num_features": 100, "batch_size": 100}},
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_real_precision_reaches_the_real_side(method: str, precision: str, tmp_path: Path, monkeypatch) -> None:
    converted = []
    real_low_precision = embedding.low_precision

    def spy(net):
        converted.append(type(net).__name__)
        return real_low_precision(net)

    monkeypatch.setattr(embedding, "low_precision", spy)
    doc = {"name": f"prec-{method}", "kind": "distill", "threads": 1, "data": {"name": "digits"},
           "method": {"name": method, **OPTIONS[method], "real_precision": precision},
           "evaluation": {"enabled": False}, "tracking": {"enabled": False}}
    if method != "dm":
        doc["privacy"] = {"epsilon": 50.0, "delta": 1e-5}
    result = run_job(validate_spec(doc, "<test>"), tmp_path, progress=False)
    assert result.status == "completed"
    if precision == "float32":
        assert converted == []
    else:  # at least one conversion per iteration (DP matchers: one per step, reused by every class)
        assert len(converted) >= OPTIONS[method]["iterations"], converted


def test_a_bad_checkpoint_policy_is_refused_before_any_folder_or_charge(tmp_path: Path, monkeypatch, capsys) -> None:
    from dpdistill.cli import main

    monkeypatch.setenv(embedding.CHECKPOINT_ENV, "sometimes")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: bad-policy\nkind: distill\ndata: {name: digits}\nprivacy: {epsilon: 1.0}\n"
                    "method: {name: ndpdc, ipc: 1, iterations: 2}\ntracking: {enabled: false}\n")
    with pytest.raises(SystemExit) as exc:
        main(["run", str(spec), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "$DPDISTILL_CHUNK_CHECKPOINT: expected auto, always or never" in err, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("status.json"))


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bfloat16_only_on_a_cpu_with_amx(amx: bool, tmp_path: Path, monkeypatch, caplog) -> None:
    """``real_precision: auto`` (the DM job's) converts the real side exactly when the CPU has AMX bf16 tiles, and
    the run's log says which arithmetic it used; a GPU device stays float32 either way."""
    converted = []
    real_low_precision = embedding.low_precision
    monkeypatch.setattr(embedding, "low_precision", lambda net: converted.append(1) or real_low_precision(net))
    monkeypatch.setattr(embedding, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(embedding, "_AUTO_LOGGED", set())
    doc = {"name": "prec-auto", "kind": "distill", "threads": 1, "data": {"name": "digits"},
           "method": {"name": "dm", **OPTIONS["dm"], "real_precision": "auto"},
           "evaluation": {"enabled": False}, "tracking": {"enabled": False}}
    with caplog.at_level("INFO", logger="dpdistill.distill.embedding"):
        result = run_job(validate_spec(doc, "<test>"), tmp_path, progress=False)
    assert result.status == "completed"
    assert (len(converted) >= OPTIONS["dm"]["iterations"]) == amx, converted
    expected = "bfloat16" if amx else "float32"
    assert f"real side computes in {expected}" in caplog.text
    # recorded per run, not only logged once per process: the spec and its hash say only 'auto'
    assert result.metrics["real_precision_bfloat16"] == (1.0 if amx else 0.0)
    assert ("real precision", f"auto: {expected} ({'the CPU has AMX bf16 tiles' if amx else 'no AMX bf16 tiles'})"
            ) in result.summary
    assert embedding.resolve_precision("auto", "cuda") == "float32"
    assert embedding.resolve_precision("bfloat16", "cuda") == "bfloat16"


def test_cpu_has_amx_reads_the_flags_of_proc_cpuinfo(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu sse avx512f amx_bf16 amx_tile", True), ("fpu sse avx512f avx512_bf16", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, _i=info, **k: real_open(_i if p == "/proc/cpuinfo"
                                                                                     else p, *a, **k))
        assert embedding.cpu_has_amx.__wrapped__() is expected


def test_auto_is_not_recorded_where_the_configuration_ignores_it(tmp_path: Path, monkeypatch) -> None:
    """DP-GenG's decoupled matching computes its one release in float32 whatever real_precision says: a run must
    not record bfloat16 for it."""
    monkeypatch.setattr(embedding, "cpu_has_amx", lambda: True)
    options = {**OPTIONS["dpgeng"], "matching": "decoupled", "real_precision": "auto"}
    doc = {"name": "prec-auto-decoupled", "kind": "distill", "threads": 1, "data": {"name": "digits"},
           "privacy": {"epsilon": 50.0, "delta": 1e-5}, "method": {"name": "dpgeng", **options},
           "evaluation": {"enabled": False}, "tracking": {"enabled": False}}
    result = run_job(validate_spec(doc, "<test>"), tmp_path, progress=False)
    assert result.status == "completed"
    assert "real_precision_bfloat16" not in result.metrics
