"""The diffusion synthesisers as jobs (`kind: synthesize`): the charged plan is in the run folder and is exactly
the ledger; a 2-worker Ray Train fit charges the same plan as a 1-worker one; a method that needs a public base
is refused before any sensitive byte is read; DP-LoRA's release holds adapters only."""

from __future__ import annotations

import json

import pytest
import torch

from dpdistill.errors import SpecError
from dpdistill.spec import validate_spec

TINY_UNET = {"block_out_channels": [16, 16], "attention": [False, False], "norm_num_groups": 8,
             "iterations": 4, "batch_size": 64, "sample_steps": 3, "n_per_class": 5, "fidelity": False}
# Public pre-training: options of the methods with a public base only (dpdm's config has no such fields).
TINY_BASE = {"pretrain_iterations": 20, "pretrain_batch": 32}


def tiny_options(method: str) -> dict:
    return {**TINY_UNET, **({} if method == "dpdm" else TINY_BASE)}


def doc(method: str, **options) -> dict:
    return {
        "name": f"diff-{method}", "kind": "synthesize", "seed": 0, "data": {"name": "digits"},
        "privacy": {"epsilon": 4.0, "reproducible_noise": False},
        "method": {"name": method, **tiny_options(method), **options},
        "evaluation": {"epochs": 2, "seeds": 1, "parallel": False, "model_options": {"width": 16}},
        "tracking": {"enabled": False},
        "ray": {"num_cpus": 2},
    }


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path / "cache"))


def _plan_and_ledger(run_dir):
    plan = json.loads((run_dir / "artifacts" / "plan.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    return plan, ledger


def test_pdp_diffusion_job_records_the_charged_plan(tmp_path, capfd):
    from dpdistill.runner import run_job

    result = run_job(validate_spec(doc("pdp-diffusion", pretrain="glyphs")), tmp_path / "runs", progress=True)
    assert result.status == "completed"
    # The in-process fit shows its progress (public: step count and wall time), as a Ray Train fit does.
    err = capfd.readouterr().err
    assert "dp-sgd step 1/4" in err and "dp-sgd step 4/4" in err, err[-2000:]
    plan, ledger = _plan_and_ledger(result.run_dir)
    assert [e["mechanism"] for e in ledger["entries"]] == [c["mechanism"] for c in plan["charges"]]
    assert plan["params"]["steps"] == 4 and plan["params"]["q"] == pytest.approx(64 / plan["params"]["n_records"])
    # The per-record backend auto resolved to, recorded in the plan (public: a function of the UNet's layers).
    assert plan["params"]["grad_sample_mode"] == "ghost"
    assert 4.0 * 0.99 <= ledger["composed"]["epsilon"] <= 4.0 * 1.001
    fit = json.loads((result.run_dir / "artifacts" / "fit_report.json").read_text())
    assert fit["steps"] == 4 and fit["noise"]["sigma"] == pytest.approx(plan["params"]["sigma"])


def test_two_ray_train_workers_charge_the_same_plan_as_one(tmp_path):
    """The 2-worker job's ledger is exactly the plan a 1-worker (in-process) fit makes: one Poisson-Gaussian over
    the whole set, charged once on the driver, not once per worker or per shard."""
    from dpdistill import data, synthesis
    from dpdistill.privacy import PrivacyLedger
    from dpdistill.runner import run_job

    two = run_job(validate_spec(doc("dpdm", train_workers=2)), tmp_path / "two", progress=False)
    assert two.status == "completed"
    plan2, ledger2 = _plan_and_ledger(two.run_dir)
    train = data.load("digits", "train")
    options = {k: v for k, v in TINY_UNET.items() if k not in ("n_per_class", "fidelity")}
    one = synthesis.create("dpdm", channels=1, image_size=train.image_size, num_classes=10, seed=0, **options)
    ledger1 = PrivacyLedger(None, 4.0, ledger2["delta"], n_records=len(train))  # the job's default δ
    plan1 = one.plan(len(train), ledger1, 4.0)
    plan1.charge(ledger1)
    # Equal but for the plan's own random id (every plan gets a fresh one; the charges carry it in their note).
    assert plan2["plan_id"] != plan1.plan_id and plan2["params"]["plan_id"] == plan2["plan_id"]
    strip = lambda d: {k: v for k, v in d.items() if k != "plan_id"}  # noqa: E731
    assert strip(plan2["params"]) == strip(plan1.params)
    assert [c["mechanism"] for c in plan2["charges"]] == [m.to_dict() for m in plan1.mechanisms]
    assert [e["mechanism"] for e in ledger2["entries"]] == [e["mechanism"] for e in ledger1.entries]
    assert ledger2["composed"]["epsilon"] == pytest.approx(ledger1.spent_epsilon(), rel=1e-12)
    # It really ran on Ray Train (a silent in-process fallback would leave no Ray Train checkpoint) ...
    assert list((two.run_dir / "train" / "dp-sgd").glob("checkpoint_*/state.pt"))
    # ... and trained: the release moved away from the seeded initialisation.
    released = torch.load(two.run_dir / "artifacts" / "synthesizer.pt", weights_only=True)["generator"]
    initial = one.generator_net.state_dict()
    assert released.keys() == initial.keys() and any(not torch.equal(released[k], initial[k]) for k in initial)


def test_dp_lora_needs_a_public_base_and_releases_adapters_only(tmp_path):
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match="method.pretrain"):
        run_job(validate_spec(doc("dp-lora")), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").rglob("ledger.json"))
    with pytest.raises(SpecError, match="train_workers"):
        run_job(validate_spec({**doc("dp-merf", train_workers=2), "method": {"name": "dp-merf",
                                                                            "train_workers": 2}}),
                tmp_path / "refused2", progress=False)
    result = run_job(validate_spec(doc("dp-lora", pretrain="glyphs")), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    saved = torch.load(result.run_dir / "artifacts" / "synthesizer.pt", weights_only=True)
    assert saved["generator"] and all("lora_" in k for k in saved["generator"])
    assert saved["extra"]["base_ref"]["kind"] == "pretrain" and saved["extra"]["base_ref"]["public_set"]


def _tiny(method: str, **options):
    from dpdistill import data, synthesis
    from dpdistill.privacy.noise import PrivacyRandomness

    train = data.load("digits", "train")
    opts = {k: v for k, v in tiny_options(method).items() if k not in ("n_per_class", "fidelity")}
    synth = synthesis.create(method, channels=1, image_size=train.image_size, num_classes=10, seed=0,
                             noise=PrivacyRandomness.reproducible(3), **{**opts, **options})
    return synth, train


def test_a_bad_lr_schedule_is_refused_before_any_run_folder(tmp_path):
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match="field 'method.lr_schedule': expected one of constant, cosine"):
        run_job(validate_spec(doc("pdp-diffusion", pretrain="glyphs", lr_schedule="linear")), tmp_path / "runs",
                progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option, bad", [("ema_decay", 1.0), ("ema_decay", -0.5), ("sample_eta", 1.5),
                                         ("sample_eta", -0.1)])
def test_a_bad_decay_or_eta_is_refused_before_any_run_folder(tmp_path, option, bad):
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match=option):
        run_job(validate_spec(doc("pdp-diffusion", pretrain="glyphs", **{option: bad})), tmp_path / "runs",
                progress=False)
    assert not (tmp_path / "runs").exists()


def test_the_sample_eta_option_reaches_the_sampler():
    """η > 0 draws DDPM's posterior noise from the sampler's public seed: another set than η = 0, the same set
    again for the same seed (generation stays reproducible post-processing)."""
    import dataclasses

    synth, _ = _tiny("dpdm")
    deterministic, labels = synth.generate(n_per_class=1, seed=4)
    synth.config = dataclasses.replace(synth.config, sample_eta=1.0)
    stochastic, again = synth.generate(n_per_class=1, seed=4), synth.generate(n_per_class=1, seed=4)
    assert torch.equal(stochastic[0], again[0]) and torch.equal(stochastic[1], labels)
    assert not torch.equal(stochastic[0], deterministic)


def test_public_pre_training_is_refused_for_dpdm_before_any_run_folder(tmp_path):
    """dpdm trains from scratch: a public set to pre-train on, or an option that would shape that pre-training,
    has no effect there, so the spec is refused (naming the field) before any run folder or data read."""
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match=r"field 'method.pretrain': dpdm trains from scratch"):
        run_job(validate_spec(doc("dpdm", pretrain="glyphs")), tmp_path / "runs", progress=False)
    for option in ("pretrain_iterations", "pretrain_seed", "base_checkpoint"):
        with pytest.raises(SpecError, match=rf"unknown key 'method.{option}'"):
            validate_spec(doc("dpdm", **{option: 1 if option != "base_checkpoint" else "/a/unet"}))
    # DP-GenG's generator: a public set for dpdm is refused, and none for a method that fine-tunes a public base.
    dpgeng = {"name": "dpgeng-gen", "kind": "distill", "seed": 0, "data": {"name": "digits"},
              "privacy": {"epsilon": 10.0}, "tracking": {"enabled": False},
              "method": {"name": "dpgeng", "generator": "dpdm", "public": "glyphs"}}
    with pytest.raises(SpecError, match=r"field 'method.public': generator 'dpdm' trains from scratch"):
        run_job(validate_spec(dpgeng), tmp_path / "runs", progress=False)
    dpgeng["method"] = {"name": "dpgeng", "generator": "pdp-diffusion"}
    with pytest.raises(SpecError, match=r"field 'method.public': generator 'pdp-diffusion' fine-tunes a public"):
        run_job(validate_spec(dpgeng), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_base_checkpoint_for_dp_ldm_is_refused_before_any_run_folder(tmp_path):
    """dp-ldm's latent UNet needs the public autoencoder it was trained with, which a diffusers UNet directory
    does not hold: the job is refused naming the field (a class property, not the method's name), and a method
    that does take one (pdp-diffusion) is not."""
    from dpdistill import synthesis
    from dpdistill.pipelines import check_public_start
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match=r"^field 'method.base_checkpoint': dp-ldm cannot start from a base "
                                        r"checkpoint \(a latent UNet needs the public autoencoder"):
        run_job(validate_spec(doc("dp-ldm", base_checkpoint=str(tmp_path))), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SpecError, match=r"name a public set to pre-train on \(e.g. glyphs\)$"):
        check_public_start(synthesis.get("dp-ldm"), None, "", "dp-ldm", "method.pretrain", "method.base_checkpoint")
    with pytest.raises(SpecError, match=r"or a local diffusers checkpoint in method.base_checkpoint$"):
        check_public_start(synthesis.get("dp-lora"), None, "", "dp-lora", "method.pretrain",
                           "method.base_checkpoint")
    check_public_start(synthesis.get("pdp-diffusion"), None, str(tmp_path), "pdp-diffusion", "method.pretrain",
                       "method.base_checkpoint")


def test_a_dpdm_run_folder_from_before_its_public_options_were_retired_still_loads(tmp_path):
    """dpdm's config had the public-base options (at values that did nothing) until they moved to
    PublicBaseConfig: an old run folder's resolved spec.yaml and an old saved synthesiser still load, without
    them; a value that is not the retired one is still refused."""
    import yaml

    from dpdistill import synthesis
    from dpdistill.spec import load_run_spec
    from dpdistill.synthesis import Synthesizer

    retired = synthesis.get("dpdm").retired_options
    assert set(retired) == {"pretrain_iterations", "pretrain_lr", "pretrain_batch", "pretrain_seed",
                            "base_checkpoint"}
    old = validate_spec(doc("dpdm")).model_dump(mode="json")
    old["method"].update(retired)  # what a run folder of then holds
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(old))
    spec = load_run_spec(tmp_path / "spec.yaml")
    assert not set(retired) & set(spec.method.options())
    old["method"]["pretrain_iterations"] = 20
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(SpecError, match="unknown key 'method.pretrain_iterations'"):
        load_run_spec(tmp_path / "spec.yaml")
    synth, _ = _tiny("dpdm")
    state = synth.state()
    state["config"] = {**state["config"], **retired}
    assert Synthesizer.from_state(state).config == synth.config


def test_a_bad_option_is_refused_before_the_budget_is_charged():
    from dpdistill.privacy import PrivacyLedger

    for bad in ({"label_dropout": 1.5}, {"sample_steps": 5000}, {"base_checkpoint": "/no/such/unet"}):
        synth, train = _tiny("pdp-diffusion", **bad)
        ledger = PrivacyLedger(None, 4.0, 1e-5)
        with pytest.raises(Exception):  # noqa: B017 - SpecError or DataError, whichever the option raises
            synth.fit(train, ledger)
        assert ledger.entries == [], bad


def test_a_dp_sgd_checkpoint_of_another_plan_is_never_resumed(tmp_path):
    from dpdistill.privacy import PrivacyLedger
    from dpdistill.privacy.noise import PrivacyRandomness
    from dpdistill.runtime.dp_train import fit_dp_sgd
    from dpdistill.training.dp_sgd import DPSGDSchedule

    synth, train = _tiny("dpdm")
    plan = synth.plan(len(train), PrivacyLedger(None, 4.0, 1e-5), 4.0)
    schedule = DPSGDSchedule(**plan.params)
    objective = synth.objective(None)
    fit_dp_sgd(objective, None, train.images, train.labels, schedule, PrivacyRandomness.reproducible(1),
               storage_path=tmp_path)
    other = synth.plan(len(train), PrivacyLedger(None, 4.0, 1e-5), 4.0)  # same numbers, another plan
    assert other.params["sigma"] == plan.params["sigma"] and other.plan_id != plan.plan_id
    with pytest.raises(Exception, match="another schedule"):
        fit_dp_sgd(objective, None, train.images, train.labels, DPSGDSchedule(**other.params),
                   PrivacyRandomness.reproducible(1), storage_path=tmp_path)


def test_a_dp_lora_release_travels_whole_to_a_worker_without_the_cache(tmp_path, monkeypatch):
    from dpdistill import data
    from dpdistill.privacy import PrivacyLedger
    from dpdistill.synthesis.base import Synthesizer

    synth, train = _tiny("dp-lora")
    synth.pretrain(data.load("glyphs", "train", image_size=train.image_size))
    synth.fit(train, PrivacyLedger(None, 4.0, 1e-5))
    here, _ = synth.generate(n_per_class=2, seed=9)
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path / "another-node"))  # the base is not in this cache
    with pytest.raises(Exception, match="diffusion checkpoint"):
        Synthesizer.from_state(synth.state())  # the saved release needs its public base
    there = Synthesizer.from_state(synth.transport_state())
    assert torch.equal(there.generate(n_per_class=2, seed=9)[0], here)


def test_dpgeng_runs_with_a_diffusion_generator(tmp_path):
    """DP-GenG's stage a can be any registered synthesiser: with pdp-diffusion, the generator's plan is booked
    under DP-GenG's generator component (a Poisson-Gaussian: its DP-SGD), beside the expert and matching."""
    from dpdistill.runner import run_job

    spec = {
        "name": "dpgeng-diffusion-tiny", "kind": "distill", "seed": 0, "data": {"name": "digits"},
        "privacy": {"epsilon": 10.0},
        "method": {"name": "dpgeng", "ipc": 2, "factor": 1, "generator": "pdp-diffusion", "public": "glyphs",
                   "generator_options": {k: v for k, v in tiny_options("pdp-diffusion").items()
                                         if k not in ("n_per_class", "fidelity")},
                   "generated_per_class": 10, "extractors": 1, "extractor_epochs": 0, "net_width": 8,
                   "expert_pretrain_epochs": 1, "expert_dp_epochs": 0.5, "iterations": 3, "batch_real": 32},
        "evaluation": {"epochs": 2, "seeds": 1, "parallel": False, "model_options": {"width": 8}},
        "tracking": {"enabled": False},
    }
    result = run_job(validate_spec(spec), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    ledger = json.loads((result.run_dir / "ledger.json").read_text())
    generator = [e for e in ledger["entries"] if e["component"] == "dpgeng/generator"]
    assert [e["mechanism"]["type"] for e in generator] == ["poisson_gaussian"]
    assert generator[0]["mechanism"]["steps"] == TINY_UNET["iterations"]


def test_more_ray_train_workers_than_the_cluster_can_place_is_refused_before_any_charge(tmp_path):
    """3 workers of 1 CPU each on a 2-CPU cluster: Ray Train would wait forever after the plan was charged;
    the job refuses first, naming the field, with an empty ledger."""
    from dpdistill.runner import run_job

    with pytest.raises(SpecError, match=r"'method.train_workers': 3 Ray Train workers need 1 CPU each .* hold 2"):
        run_job(validate_spec(doc("dpdm", train_workers=3)), tmp_path / "runs", progress=False)
    # More workers than records: refused in prepare, before the run folder exists.
    with pytest.raises(SpecError, match=r"'method.train_workers': 100000 workers for \d+ sensitive records"):
        run_job(validate_spec(doc("dpdm", train_workers=100_000)), tmp_path / "early", progress=False)
    assert not (tmp_path / "early").exists()
    for ledger_file in (tmp_path / "runs").glob("*/*/ledger.json"):
        assert json.loads(ledger_file.read_text())["entries"] == []
    (status,) = (tmp_path / "runs").glob("*/*/status.json")
    assert json.loads(status.read_text())["status"] == "failed"

