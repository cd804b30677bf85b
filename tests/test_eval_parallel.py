"""Evaluation seeds trained side by side in worker processes: same models as the in-process loop, the thread pin
honoured, failures and Ctrl-C surface at once and leave no worker behind; micro-batched channels_last training
and chunked scoring compute what whole batches did."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from dpdistill import data, models
from dpdistill.errors import SpecError
from dpdistill.evaluation import workers as eval_workers
from dpdistill.evaluation.training import THREADS_ENV, accuracy, train_classifier
from dpdistill.evaluation.utility import evaluate_utility
from eval_probes import Boom, Die, ThreadProbe

TESTS = Path(__file__).resolve().parent
# A small ConvNet for 8x8 digits: a few seconds per seed.
QUICK = dict(num_classes=10, model="convnet", model_kwargs={"width": 8, "depth": 2}, epochs=3, batch_size=64,
             lr=0.01, mean=(0.5,), std=(0.5,), progress=False)


@pytest.fixture(scope="module")
def digits():
    train = data.load("digits", "train").subset(torch.arange(256))
    test = data.load("digits", "test")
    return train.images, train.labels, test.images, test.labels


@pytest.fixture(autouse=True)
def _no_worker_left_behind():
    yield
    assert multiprocessing.active_children() == []


def test_workers_and_the_in_process_loop_train_the_same_models(digits):
    x, y, tx, ty = digits
    kw = dict(QUICK, seeds=(0, 1, 2), num_threads=1, extra_sets={"val": (tx[:100], ty[:100])},
              augment="dsa-lite")
    in_process = evaluate_utility(x, y, tx, ty, workers=1, **kw)
    side_by_side = evaluate_utility(x, y, tx, ty, workers=2, **kw)
    assert side_by_side.accuracies == in_process.accuracies  # exact: same ops, same thread count
    assert side_by_side.extra == in_process.extra
    assert len(set(in_process.accuracies)) > 1  # the seeds really differ (results kept in seed order)


@pytest.mark.parametrize("threads", [1, 2])
def test_workers_train_with_the_pinned_thread_count(digits, threads):
    x, y, tx, ty = digits
    result = evaluate_utility(x, y, tx, ty, seeds=(0, 1), workers=2, num_threads=threads,
                              augment=ThreadProbe(threads), **{**QUICK, "epochs": 1})
    assert len(result.accuracies) == 2


def test_the_worker_plan_follows_the_pin_the_cores_and_the_work(digits, monkeypatch):
    x, y, tx, ty = digits
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv(eval_workers.EVAL_WORKERS_ENV, raising=False)
    monkeypatch.setattr(eval_workers, "usable_cores", lambda: 4)

    def job(**changes):
        base = dict(train_images=x, train_labels=y, test_images=tx, test_labels=ty, num_classes=10,
                    model="convnet", model_kwargs={}, epochs=300, batch_size=256, lr=0.01, momentum=0.9,
                    weight_decay=5e-4, augment="dsa-lite", mean=None, std=None, device=torch.device("cpu"),
                    eval_batch_size=1024, micro_batch=32)
        return eval_workers.SeedJob(**{**base, **changes})

    plan = eval_workers.plan_workers
    assert plan(job(), range(6), None, None) == (4, 1)  # unpinned: one thread per core
    assert plan(job(), range(3), None, None) == (3, 1)  # never more workers than seeds
    assert plan(job(), range(6), None, 2) == (2, 2)
    assert plan(job(), range(6), None, 4)[0] == 1  # the pin takes every core: the in-process loop
    monkeypatch.setenv(THREADS_ENV, "2")
    assert plan(job(), range(6), None, None) == (2, 2)
    monkeypatch.delenv(THREADS_ENV)
    assert plan(job(), range(1), None, None)[0] == 1
    assert plan(job(epochs=3), range(6), None, None)[0] == 1  # too little work to pay for the start-up
    assert plan(job(device=torch.device("meta")), range(6), None, None)[0] == 1
    assert plan(job(augment=lambda images: images), range(6), None, None)[0] == 1  # does not pickle
    with pytest.raises(SpecError, match="do not pickle"):
        plan(job(augment=lambda images: images), range(6), 2, None)
    assert plan(job(), range(6), 1, None)[0] == 1  # the old path on request
    monkeypatch.setenv(eval_workers.EVAL_WORKERS_ENV, "1")
    assert plan(job(), range(6), None, None)[0] == 1
    monkeypatch.setenv(eval_workers.EVAL_WORKERS_ENV, "two")
    with pytest.raises(SpecError, match="DPDISTILL_EVAL_WORKERS"):
        plan(job(), range(6), None, None)


def test_an_error_in_a_worker_is_raised_naming_its_seed(digits):
    x, y, tx, ty = digits
    with pytest.raises(ValueError, match="boom from the augmentation") as caught:
        evaluate_utility(x, y, tx, ty, seeds=(5, 6), workers=2, augment=Boom(), **QUICK)
    assert any("while training seed" in note for note in getattr(caught.value, "__notes__", []))


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(digits):
    x, y, tx, ty = digits
    with pytest.raises(RuntimeError, match="worker process died while training seed"):
        evaluate_utility(x, y, tx, ty, seeds=(0, 1), workers=2, augment=Die(), **QUICK)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_terminates_the_workers(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    script = textwrap.dedent(f"""
        import torch
        from eval_probes import PidThenSleep
        from dpdistill.evaluation.utility import evaluate_utility
        x = torch.rand(64, 1, 8, 8)
        y = torch.arange(64) % 10
        evaluate_utility(x, y, x, y, num_classes=10, model_kwargs={{"width": 8, "depth": 2}}, seeds=(0, 1),
                         epochs=2, workers=2, augment=PidThenSleep({str(pids)!r}), progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180  # spawned workers import torch: seconds on a loaded machine
        while len(list(pids.glob("*.pid"))) < 2:
            assert driver.poll() is None, driver.stderr.read()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pids.glob("*.pid")]
        assert not any(_gone(pid) for pid in workers)
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    deadline = time.monotonic() + 30  # terminate() then join: the workers are already being reaped
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if not _gone(pid)]
    for pid in left:  # do not leave them sleeping when this fails
        os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_micro_batches_compute_the_whole_batch_step(digits, norm):
    x, y, _, _ = digits
    trained = []
    for micro_batch in (None, 16):
        torch.manual_seed(0)
        net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2, norm=norm)
        train_classifier(net, x, y, epochs=2, batch_size=64, generator=torch.Generator().manual_seed(0),
                         num_threads=1, micro_batch=micro_batch)
        assert all(p.is_contiguous() for p in net.parameters())  # memory format restored
        trained.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    if norm == "batch":
        # Batch statistics need the whole batch: micro_batch is ignored, the same computation exactly.
        assert torch.equal(trained[0], trained[1])
    else:
        assert torch.allclose(trained[0], trained[1], rtol=1e-4, atol=1e-5)


def test_chunked_channels_last_scoring_matches_whole_batches(digits):
    x, y, tx, ty = digits
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2)
    train_classifier(net, x, y, epochs=5, batch_size=32, generator=torch.Generator().manual_seed(0), num_threads=1)
    with torch.no_grad():
        logits = net((tx - 0.5) / 0.5)
    margin = logits.topk(2, dim=1).values.diff(dim=1).abs().min()
    assert margin > 1e-4  # no near-tie that float reordering could flip
    expected = int((logits.argmax(1) == ty).sum()) / len(ty)
    assert accuracy(net, tx, ty, mean=0.5, std=0.5) == expected
    assert accuracy(net, tx, ty, batch_size=50, mean=0.5, std=0.5) == expected
    assert all(p.is_contiguous() for p in net.parameters())


def test_inside_a_ray_task_the_usable_cores_are_the_tasks_cpus():
    # A Tune trial evaluating in-process must not start more workers than the CPUs Ray gave it.
    import ray

    def _cores_in_task() -> int:  # nested: Ray ships it by value (workers cannot import this test module)
        from dpdistill.evaluation.training import usable_cores

        return usable_cores()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        one = ray.remote(num_cpus=1)(_cores_in_task)
        two = ray.remote(num_cpus=2)(_cores_in_task)
        assert ray.get([one.remote(), two.remote()]) == [1, 2]
    finally:
        ray.shutdown()
