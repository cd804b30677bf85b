"""Suite-wide fixtures.

Every test starts from the same global RNG state (torch, numpy, random), whichever tests ran before it in its
worker: a test that draws from the global generator (``torch.rand(4, 6)``) then sees the same numbers locally,
under ``-n 2 --dist loadfile`` in CI and alone. Without it, an input that ~2 % of global states make degenerate
(every hidden unit dead in test_synthesis_defects' NTK check) failed by test order only. The seed is set in
the first setup hook, before the test's fixtures are set up, so function- and module-scoped fixtures drawing
from the global generators are covered too (a session-scoped one is set up once, at its first test). Privacy
noise never comes from these generators (it comes from the secret source, ``dpdistill.privacy.noise``), so
this fixes no noise draw; the statistical tests of the noise draw from that source as the product does.

The suite also pins torch's intra-op threads to one ($DPDISTILL_THREADS, as a spec's ``threads: 1`` does, set
before any test or Ray cluster starts so every run, subprocess and Ray worker inherits it). Unpinned, a job
uses the cores other processes leave free when a stage starts (``evaluation.training.free_cores``), and float
reductions depend on the thread count: two consecutive runs that a test compares to the last digit picked
different counts on a shared CI machine (two xdist workers on two cores), and differed. Tests of the unpinned
rule clear the variable themselves (tests/test_threads.py, tests/test_eval_parallel.py).

Order. Under ``-n 2 --dist loadfile`` each module goes whole to one worker, and the suite's wall time is the
busier worker's. xdist by default queues modules by their NUMBER of tests, which put the slowest module (the
sweep resume: one test, two minutes) among the last, where the other worker can run out of work while it runs
(summed test time over two, against the wall time: about 100 s idle in a full run). Here xdist's reorder is
turned off and the modules measured slowest (``--durations``) are queued first, the rest in file order: the
long ones overlap and the many short ones fill in behind them. A module missing from the list only runs later.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dpdistill.evaluation.training import THREADS_ENV

os.environ.setdefault(THREADS_ENV, "1")


# Slowest first, by their summed setup + call + teardown in a full run (pytest --durations=0, December 2026).
SLOW_MODULES_FIRST = (
    "test_sweep_resume.py", "test_ray_jobs.py", "test_allocation_sweep.py", "test_lira.py", "test_dp_train_ray.py",
    "test_federated_protocol.py", "test_diffusion_jobs.py", "test_conformance.py", "test_run_job.py",
    "test_compile.py", "test_k8s_rayjob.py", "test_eval_parallel.py", "test_evaluate_synthesize.py",
    "test_dpgeng_pipeline.py", "test_sweeps.py", "test_privacy_ledger.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist installed (the dev extra)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
