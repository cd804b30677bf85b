"""Deterministic threading: with the spec's ``threads`` pinned, Ray and in-process evaluation agree to the last digit."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dpdistill import data
from dpdistill.evaluation.training import THREADS_ENV, resolve_threads, thread_limit
from dpdistill.runner import pinned_threads, run_job
from dpdistill.runtime.parallel import evaluate_seeds
from dpdistill.spec import validate_spec


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_pinned_count_wins_over_the_load_heuristic(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert resolve_threads(None) == 2 and resolve_threads(1) == 1
    with thread_limit(None) as n:
        assert n == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv(THREADS_ENV)
    prior = torch.get_num_threads()
    with pinned_threads(1):
        assert os.environ[THREADS_ENV] == "1" and torch.get_num_threads() == 1
    assert THREADS_ENV not in os.environ and torch.get_num_threads() == prior


@pytest.mark.parametrize("threads", [1, 2])
def test_ray_and_in_process_evaluation_agree_to_the_last_digit(ray_cluster, threads):
    train = data.load("digits", "train").subset(torch.arange(200))
    test = data.load("digits", "test")
    kw = dict(num_classes=10, model="convnet", model_kwargs={"width": 8, "depth": 2}, epochs=3, batch_size=64,
              lr=0.01, mean=(0.5,), std=(0.5,), num_threads=threads)
    on_ray = evaluate_seeds(train.images, train.labels, test.images, test.labels, [0, 1], use_ray=True, **kw)
    here = evaluate_seeds(train.images, train.labels, test.images, test.labels, [0, 1], use_ray=False,
                          progress=False, **kw)
    assert on_ray["test"]["accuracies"] == here["test"]["accuracies"]  # exact, not approx


def test_a_job_with_threads_pinned_gives_the_same_figure_on_ray_and_in_process(ray_cluster, tmp_path):
    doc = {"name": "dm-threads", "kind": "distill", "data": {"name": "digits"}, "threads": 1,
           "method": {"name": "dm", "ipc": 1, "iterations": 5},
           "evaluation": {"seeds": 2, "epochs": 3, "model_options": {"width": 8}}, "tracking": {"enabled": False}}
    figures = []
    for parallel in (True, False):
        doc["evaluation"]["parallel"] = parallel
        result = run_job(validate_spec(doc), tmp_path / f"runs-{parallel}", progress=False)
        figures.append(json.loads((result.run_dir / "metrics.json").read_text())["acc_mean"])
    assert figures[0] == figures[1]
