"""The opt-in torch.compile path (dpdistill.models.compiled): it really compiles, it computes what the eager
path computes (to float rounding), and a machine that cannot compile runs eagerly instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from benchmark_scripts import load_benchmark
from dpdistill import models
from dpdistill.distill import embedding
from dpdistill.evaluation.training import train_classifier
from dpdistill.models.compiled import COMPILE_ENV, available, compiled
from dpdistill.runner import compiled_loops

REPO = Path(__file__).resolve().parent.parent


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _net(seed: int = 0, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.get("convnet", channels=1, num_classes=4, image_size=16, width=width)


def test_this_machine_compiles() -> None:
    # The premise of the tests below (CI has a C++ compiler): without it they would compare eager with eager.
    assert available()


def test_a_compiled_training_step_trains_the_same_model() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(72, 1, 16, 16, generator=g), torch.arange(72) % 4

    def train(flag: bool) -> torch.nn.Module:
        net = _net()
        # Batches of 64 and 8, micro-batches of 32: two chunk sizes, so the dynamic recompile is exercised.
        return train_classifier(net, x, y, epochs=3, batch_size=64, micro_batch=32, augment="dsa-lite",
                                generator=torch.Generator().manual_seed(1), compile=flag, num_threads=1)

    before = _graphs()
    fast = train(True)
    assert _graphs() > before, "compile=True traced no graph"
    plain = train(False)
    for (name, a), (_, b) in zip(fast.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # The model is handed back as it came: eval mode, its own memory format, no compiled wrapper inside.
    assert not fast.training and not any("_orig_mod" in k for k in fast.state_dict())


# A width of its own per case: weights of new shapes need a new graph, so each case's counter check is its own.
@pytest.mark.parametrize(("checkpointed", "width"), [("never", 6), ("always", 5)])
def test_compiled_embeddings_equal_the_eager_ones(monkeypatch: pytest.MonkeyPatch, checkpointed: str,
                                                  width: int) -> None:
    # Both synthetic-side paths: chunks that keep their activations, and checkpointed chunks recomputed in the
    # backward (the compiled function then runs again under the checkpoint's saved-tensor hooks).
    monkeypatch.setenv(embedding.CHECKPOINT_ENV, checkpointed)
    net = embedding.prepare(_net(3, width))
    x = torch.randn(64, 1, 16, 16)  # two chunks of 32 (the training test covers a second chunk size)
    monkeypatch.setenv(COMPILE_ENV, "0")
    want = embedding.embed_no_grad(net, x)
    xg = x.clone().requires_grad_(True)
    embedding.embed(net, xg).square().sum().backward()
    monkeypatch.setenv(COMPILE_ENV, "1")
    before = _graphs()
    got = embedding.embed_no_grad(net, x)
    xc = x.clone().requires_grad_(True)
    embedding.embed(net, xc).square().sum().backward()
    assert _graphs() > before, "the compiled embedding traced no graph"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xc.grad, xg.grad, rtol=1e-4, atol=1e-5)


def test_a_module_with_hooks_keeps_its_eager_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # opacus' grad sampler works through forward hooks, which a compiled forward would bypass.
    monkeypatch.setenv(COMPILE_ENV, "1")
    net = _net()
    seen: list[int] = []
    net.register_forward_hook(lambda _m, _i, out: seen.append(len(out)))
    call = compiled(net, "forward")
    assert call is net
    call(torch.rand(2, 1, 16, 16))
    assert seen == [2]


def test_evaluation_ray_tasks_get_the_compile_choice_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Ray worker does not inherit the driver's environment, so the job's choice must travel in the task's
    # arguments (as the thread count does).
    from dpdistill.runtime.parallel import task_kwargs

    monkeypatch.setenv(COMPILE_ENV, "1")
    assert task_kwargs({"epochs": 3}, None) == {"epochs": 3, "device": task_kwargs({}, None)["device"],
                                                "num_threads": 1, "compile": True}
    assert task_kwargs({"compile": False}, 2)["compile"] is False
    assert task_kwargs({}, 2)["num_threads"] == 2
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert task_kwargs({}, None)["compile"] is False


def test_the_runner_sets_the_variable_for_the_job_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    with compiled_loops(True):
        assert os.environ[COMPILE_ENV] == "1"
    assert COMPILE_ENV not in os.environ
    monkeypatch.setenv(COMPILE_ENV, "1")  # an outer shell's setting does not override a spec that says no
    with compiled_loops(False):
        assert os.environ[COMPILE_ENV] == "0"
    assert os.environ[COMPILE_ENV] == "1"


def test_a_machine_that_cannot_compile_trains_eagerly_with_one_warning(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import torch
        from dpdistill import models
        from dpdistill.evaluation.training import train_classifier
        from dpdistill.models.compiled import available
        torch.manual_seed(0)
        net = models.get("convnet", channels=1, num_classes=2, image_size=8, width=4)
        x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 2
        train_classifier(net, x, y, epochs=1, batch_size=16, micro_batch=8, compile=True, num_threads=1)
        train_classifier(net, x, y, epochs=1, batch_size=16, micro_batch=8, compile=True, num_threads=1)
        print("available", available())
    """)
    # No compiler on the search path, and an empty compile cache (a cached probe would need no compiler).
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "available False" in proc.stdout
    assert proc.stderr.count("torch.compile is unavailable here") == 1, proc.stderr[-2000:]


def test_recorded_spec_hashes_ignore_compile_only_when_it_is_off() -> None:
    bench_runs = load_benchmark("bench_runs")
    resolved = {"name": "x", "seed": 0, "method": {"name": "dm"}}
    assert bench_runs.spec_hash({**resolved, "compile": False}) == bench_runs.spec_hash(resolved)
    assert bench_runs.spec_hash({**resolved, "compile": True}) != bench_runs.spec_hash(resolved)


def test_the_real_side_compiles_one_graph_whatever_the_poisson_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiled call compiles, and caches on disk, a graph per input shape: the no-grad real side must show it
    # only the chunk size, never a Poisson batch's private size (its last chunk is padded).
    monkeypatch.setenv(COMPILE_ENV, "1")
    net = embedding.prepare(_net(4, width=7)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    # Warm-up: a full chunk (a view of the batch) and a padded one (a new tensor) are two graphs of one shape;
    # dynamo guards on whether its input is a view. After them, no batch size may add a graph.
    for warm in (torch.randn(32, 1, 16, 16), torch.randn(40, 1, 16, 16)):
        embedding.embed_no_grad(net, warm)
        with torch.no_grad():
            embedding.embed(net, warm)
    after_first = _graphs()
    for n in (1, 2, 17, 33, 63):
        x = torch.randn(n, 1, 16, 16)
        got = embedding.embed_no_grad(net, x)
        with torch.no_grad():
            want = net.embed(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # the decoupled release's path (MatchingBank.features: embed without gradient)
            torch.testing.assert_close(embedding.embed(net, x), want, rtol=1e-4, atol=1e-5)
    assert _graphs() == after_first, "a batch size reached the compiler"
