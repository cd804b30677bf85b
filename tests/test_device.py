"""The spec's ``device`` is honoured end to end: refused in one line before any data is read when this machine
lacks it, and otherwise the resolved device reaches the method, the evaluation and the SFDD clients, and the
run records the device it used.

This machine has no GPU, so the tests that follow a CUDA device through a pipeline make torch report one
(``fake_cuda``) and stop each consumer at its door with a spy that records the device it was handed; the
spies then run the real work on the CPU, so the runs complete. A pipeline that ignored ``spec.device`` would
hand the spies ``cpu`` (or nothing) and fail them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from dpdistill.errors import SpecError
from dpdistill.runtime.device import check_device, ray_gpus, resolve_device, worker_device
from dpdistill.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]
DM = {"name": "dev-dm", "kind": "distill", "data": {"name": "digits"}, "device": "auto",
      "method": {"name": "dm", "ipc": 1, "iterations": 2, "net_width": 8, "net_depth": 2},
      "evaluation": {"seeds": 1, "epochs": 1, "parallel": False, "model_options": {"width": 8}},
      "tracking": {"enabled": False}}
SYNTH = {"name": "dev-synth", "kind": "synthesize", "data": {"name": "digits"}, "privacy": {"epsilon": 4.0},
         "method": {"name": "dp-merf", "num_features": 200, "iterations": 5, "batch_size": 100,
                    "n_per_class": 10, "fidelity": False},
         "evaluation": {"seeds": 1, "epochs": 1, "parallel": False, "model_options": {"width": 8}},
         "tracking": {"enabled": False}}
SFDD = {"name": "dev-sfdd", "kind": "sfdd", "data": {"name": "digits"},
        "method": {"name": "sfdd", "n_clients": 2, "rounds": 1, "ipc": 1, "outer_loop": 2, "inner_loop": 1,
                   "net_width": 8, "net_depth": 2, "batch_real": 16, "batch_train": 16, "eval_every": 1,
                   "eval_epochs": 1},
        "evaluation": {"seeds": 1, "epochs": 1, "parallel": True, "model_options": {"width": 8}},
        "tracking": {"enabled": False}}


class Reached(Exception):
    """A spy saw what it waited for."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports one CUDA device (nothing may actually run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def seen_evaluation(monkeypatch):
    """Replace the final utility evaluation by a spy: the devices it was asked to use (no training)."""
    import dpdistill.runtime.parallel as parallel

    devices: list[object] = []

    def spy(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return {"test": {"mean": 0.5, "std": 0.0, "accuracies": [0.5]}}

    monkeypatch.setattr(parallel, "evaluate_seeds", spy)
    return devices


def status_of(result_or_runs) -> dict:
    run_dir = getattr(result_or_runs, "run_dir", None)
    if run_dir is None:
        (job,) = list(result_or_runs.iterdir())
        (run_dir,) = list(job.iterdir())
    return json.loads((run_dir / "status.json").read_text())


# --- refused before starting -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
@pytest.mark.parametrize("job", ["jobs/dm-digits.yaml", "jobs/synth-dp-merf-mnist.yaml", "jobs/sfdd-mnist.yaml"])
def test_a_device_this_machine_lacks_is_one_line_exit_2_and_no_run_folder(job, device, tmp_path, monkeypatch,
                                                                          capsys):
    import dpdistill.pipelines.distill_job as distill_job
    from dpdistill.cli import main

    try:
        check_device(device)
        pytest.skip(f"this machine has {device}")
    except SpecError:
        pass

    def no_data(*args, **kwargs):  # every kind loads its splits through this: the refusal must come first
        raise AssertionError("data read before the device was checked")

    monkeypatch.setattr(distill_job, "load_splits", no_data)
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(ROOT / job), "--set", f"device={device}", "--runs-dir", str(runs), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert len(err.splitlines()) == 1 and "field 'device'" in err and device in err, err
    assert "use device: cpu or auto" in err
    assert not runs.exists() or not any(runs.iterdir())


def test_a_missing_cuda_index_is_refused_naming_the_devices_there(fake_cuda):
    check_device("cuda:0")
    with pytest.raises(SpecError, match=r"field 'device': cuda:1 requested but this machine has 1 CUDA device"):
        check_device("cuda:1")


def test_auto_resolves_to_cuda_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_ray_workers_ask_for_a_gpu_share_and_name_the_gpu_they_see():
    assert ray_gpus(torch.device("cpu"), 3) == 0.0
    assert ray_gpus(torch.device("cuda", 1), 4) == 0.25
    assert worker_device(torch.device("cuda", 1)) == "cuda"  # Ray numbers a worker's GPUs from 0
    assert worker_device(torch.device("cpu")) == "cpu"


# --- the device reaches the method -------------------------------------------------------------------------------

def spy_distiller(monkeypatch, devices: list, run_on: str | None):
    """Wrap the prepared distiller's ``run``: record its ``device``; call through on ``run_on`` (None: stop)."""
    from dpdistill.pipelines.distill_job import DistillPipeline

    prepare = DistillPipeline.prepare

    class Spy:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def run(self, real, cfg, **kwargs):
            devices.append(kwargs.get("device"))
            if run_on is None:
                raise Reached
            return self._inner.run(real, cfg, **{**kwargs, "device": run_on})

    def spied(self, spec):
        prepared = prepare(self, spec)
        prepared.method = Spy(prepared.method)
        return prepared

    monkeypatch.setattr(DistillPipeline, "prepare", spied)


def test_distill_auto_runs_on_the_resolved_cpu_and_says_so(tmp_path, monkeypatch):
    from dpdistill.runner import run_job

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices: list = []
    spy_distiller(monkeypatch, devices, run_on="cpu")
    result = run_job(validate_spec(dict(DM)), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    assert devices == [torch.device("cpu")]  # the pipeline passed the resolved device, not the spec's word
    assert status_of(result)["device"] == "cpu"
    assert dict(result.summary)["device"] == "cpu (device: auto)"
    released = torch.load(result.run_dir / "artifacts" / "distilled.pt", weights_only=True)
    assert released["images"].device.type == "cpu"


@pytest.mark.parametrize("device, expected", [("cuda", "cuda"), ("auto", "cuda"), ("cuda:0", "cuda:0")])
def test_distill_hands_the_cuda_device_to_the_method_and_the_evaluation(device, expected, tmp_path, monkeypatch,
                                                                         fake_cuda, seen_evaluation):
    from dpdistill.runner import run_job

    devices: list = []
    spy_distiller(monkeypatch, devices, run_on="cpu")
    result = run_job(validate_spec({**DM, "device": device}), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    assert devices == [torch.device(expected)]
    assert seen_evaluation == [torch.device(expected)]
    assert status_of(result)["device"] == expected


def test_a_stopped_cuda_run_still_records_its_device(tmp_path, monkeypatch, fake_cuda):
    from dpdistill.runner import run_job

    devices: list = []
    spy_distiller(monkeypatch, devices, run_on=None)
    with pytest.raises(Reached):
        run_job(validate_spec({**DM, "device": "cuda"}), tmp_path / "runs", progress=False)
    status = status_of(tmp_path / "runs")
    assert status["status"] == "failed" and status["device"] == "cuda"


def test_synthesize_builds_the_synthesiser_on_the_resolved_device(tmp_path, monkeypatch, fake_cuda,
                                                                  seen_evaluation):
    from dpdistill.pipelines.synthesize_job import SynthesizePipeline
    from dpdistill.runner import run_job

    prepare = SynthesizePipeline.prepare
    devices: list = []

    def spied(self, spec):
        prepared = prepare(self, spec)
        cls = prepared.method

        def build(*args, **kwargs):
            devices.append(kwargs["device"])
            # From here on the work runs on the CPU, whose optimisers must not believe in CUDA.
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
            return cls(*args, **{**kwargs, "device": "cpu"})

        prepared.method = build
        return prepared

    monkeypatch.setattr(SynthesizePipeline, "prepare", spied)
    result = run_job(validate_spec({**SYNTH, "device": "cuda"}), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    assert devices == [torch.device("cuda")] and seen_evaluation == [torch.device("cuda")]
    assert status_of(result)["device"] == "cuda"


def test_sfdd_clients_and_evaluations_get_the_resolved_device(tmp_path, monkeypatch, fake_cuda, seen_evaluation):
    import dataclasses

    import dpdistill.evaluation.utility as utility
    import dpdistill.runtime.client_pool as actors
    import dpdistill.runtime.cluster as cluster
    from dpdistill.federated import LocalPool
    from dpdistill.runner import run_job

    client_devices: list = []
    quick_devices: list = []

    def pool(train, partition, ctx, *args, noise=None, **kwargs):  # the actor pool's signature
        client_devices.append(ctx.device)
        return LocalPool(train, partition, dataclasses.replace(ctx, device="cpu"), noise=noise)

    evaluate = utility.evaluate_utility

    def quick(*args, **kwargs):
        quick_devices.append(kwargs.get("device"))
        return evaluate(*args, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(actors, "ActorPool", pool)
    monkeypatch.setattr(utility, "evaluate_utility", quick)
    monkeypatch.setattr(cluster, "ray_session", lambda *a, **k: contextlib.nullcontext())  # no Ray: spies only
    result = run_job(validate_spec({**SFDD, "device": "cuda"}), tmp_path / "runs", progress=False)
    assert result.status == "completed"
    assert client_devices == ["cuda"]
    assert quick_devices == [torch.device("cuda")] and seen_evaluation == [torch.device("cuda")]
    assert status_of(result)["device"] == "cuda"


def test_a_client_reads_its_device_from_the_context(monkeypatch):
    """local_update resolves ctx.device in its own process and builds its networks there."""
    import dpdistill.federated.client as client
    import dpdistill.runtime.device as device_module
    from dpdistill import data
    from dpdistill.federated import ClientContext, ClientTask, SFDDConfig, initial_set

    info = data.get("digits").info
    real = data.load("digits", "train").subset(list(range(100)))
    cfg = SFDDConfig(n_clients=1, ipc=1, outer_loop=2, inner_loop=1, net_width=8, net_depth=2, batch_real=8,
                     batch_train=8)
    init = initial_set(cfg, 10, (1, 8, 8), 0, mean=list(info.mean), std=list(info.std))
    asked: list = []
    built: list = []
    build_net = client.build_net

    def resolve(name):
        asked.append(name)
        return torch.device("cpu")

    def spy_build(cfg, real, g, device):
        built.append(device)
        return build_net(cfg, real, g, device)

    monkeypatch.setattr(device_module, "resolve_device", resolve)
    monkeypatch.setattr(client, "build_net", spy_build)
    update = client.local_update(real, init.state_dict(), ClientTask(0, 0),
                                 ClientContext(cfg, info.mean, info.std, device="cuda:3"))
    assert asked == ["cuda:3"] and built == [torch.device("cpu")] * cfg.local_steps
    assert update.images.device.type == "cpu"


class FakeRay(types.ModuleType):
    """Just enough of ``ray`` for a pool or a task to be built: records the resources asked for."""

    def __init__(self) -> None:
        super().__init__("ray")
        self.options: list[dict] = []
        self.exceptions = types.ModuleType("ray.exceptions")

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        return {"CPU": 4.0, "GPU": 1.0}

    available_resources = cluster_resources

    def put(self, value):
        return value

    def get(self, refs):
        return refs

    def remote(self, **options):
        self.options.append(options)

        def wrap(target):
            return types.SimpleNamespace(remote=lambda *args: target(*args))

        return wrap


@pytest.fixture
def fake_ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", fake.exceptions)
    return fake


@pytest.mark.parametrize("device, gpus, seen", [("cpu", 0.0, "cpu"), ("cuda:1", 0.5, "cuda")])
def test_the_actor_pool_asks_ray_for_gpus_and_sends_the_workers_device(fake_ray, monkeypatch, device, gpus, seen):
    import dpdistill.runtime.client_pool as actors
    from dpdistill import data
    from dpdistill.data.partition import make_partition
    from dpdistill.federated import ClientContext, SFDDConfig
    from dpdistill.runtime.client_pool import ActorPool

    monkeypatch.setattr(actors, "ClientWorker", lambda *args: object())  # no actor body in this process

    train = data.load("digits", "train").subset(list(range(40)))
    cfg = SFDDConfig(n_clients=2, ipc=1)
    part = make_partition("iid", train.labels, 2, seed=0, images=train.images, num_classes=10)
    pool = ActorPool(train, part, ClientContext(cfg, [0.5], [0.5], device=device), size=2)
    assert fake_ray.options[-1]["num_gpus"] == gpus
    assert pool.ctx.device == seen


@pytest.mark.parametrize("device, gpus, seen", [("cpu", 0.0, "cpu"), ("cuda:1", 0.5, "cuda")])
def test_ray_evaluation_tasks_ask_for_gpus_and_get_the_workers_device(fake_ray, monkeypatch, device, gpus, seen):
    import dpdistill.runtime.parallel as parallel

    got: list = []

    def one_seed(train_x, train_y, test_x, test_y, extra_sets, seed, kwargs):
        got.append(kwargs["device"])
        return 0.5, {}

    monkeypatch.setattr(parallel, "_evaluate_one_seed", one_seed)
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    out = parallel.evaluate_seeds(x, y, x, y, [0, 1], use_ray=True, device=torch.device(device))
    assert out["test"]["mean"] == 0.5
    assert fake_ray.options == [{"num_cpus": 1, "num_gpus": gpus}]
    assert got == [seen, seen]
