"""SFDD LocalDP against its own server: a client's randomness is its own, so the server cannot replay a client
and subtract its noise (issue 19, finding 2). In-process (LocalPool); the Ray actors' version of the check is
in test_federated_protocol.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dpdistill import data
from dpdistill.data.partition import Partition
from dpdistill.distill.synthetic import SyntheticSet
from dpdistill.evaluation.training import thread_limit
from dpdistill.federated import (
    ClientContext,
    ClientTask,
    FedAvg,
    LocalDP,
    LocalPool,
    SFDDConfig,
    initial_set,
    local_update,
    run_sfdd,
)
from dpdistill.privacy.noise import PrivacyRandomness

INFO = data.get("digits").info
SIGMA, CLIP = 0.5, 1.0
TINY = dict(ipc=1, outer_loop=2, inner_loop=1, net_width=8, net_depth=2, batch_real=16, batch_train=16)


def two_clients(train) -> Partition:
    # Built by hand (even / odd records) so the test does not depend on the partitioners' API.
    idx = [np.arange(0, len(train), 2), np.arange(1, len(train), 2)]
    counts = np.stack([np.bincount(train.labels.numpy()[i], minlength=10) for i in idx])
    return Partition(idx, counts)


def clip(update: torch.Tensor) -> torch.Tensor:
    return update * min(1.0, CLIP / (float(update.norm()) + 1e-12))


def test_the_servers_replay_attack_no_longer_recovers_a_clients_update(monkeypatch):
    """The attack of the audit: replay the task the server sent on the client's own data, once with LocalDP
    (same noise, if the server's seed fixed it) and once without (the update), and subtract. On the old code
    the recovered clipped update matched the true one to ~1e-6; now the error is the noise (std ~sqrt(2) sigma C)."""
    train = data.load("digits", "train")
    cfg = SFDDConfig(**TINY, n_clients=2, rounds=1, defence="localdp", localdp_sigma=SIGMA, localdp_clip=CLIP)
    ctx = ClientContext(cfg, INFO.mean, INFO.std)
    plain_ctx = ClientContext(cfg.model_copy(update={"defence": "none"}), INFO.mean, INFO.std)
    init = initial_set(cfg, 10, (1, 8, 8), 0, mean=INFO.mean, std=INFO.std)

    truth: list[torch.Tensor] = []  # what each LocalDP call was given: the true update before clipping
    privatise = LocalDP.privatise

    def spy(self, update, *args, **kwargs):
        truth.append(update.detach().clone())
        return privatise(self, update, *args, **kwargs)

    monkeypatch.setattr(LocalDP, "privatise", spy)
    sent, answers = [], []

    class Server(LocalPool):  # keeps what the server sent and what came back
        def run_round(self, tasks, syn_state, on_dispatch=None):
            sent.append((tasks, syn_state))
            outcome = super().run_round(tasks, syn_state, on_dispatch)
            answers.extend(outcome.updates)
            return outcome

    pool = Server(train, two_clients(train), ctx, num_threads=1)
    run_sfdd(pool, init, cfg, seed=0, strategy=FedAvg(weighting="uniform"))
    (tasks, state), true_updates = sent[0], list(truth)
    assert len(tasks) == len(answers) == len(true_updates) == 2
    start = SyntheticSet.from_state_dict(state).images.detach()
    for task, answer, update in zip(tasks, answers, true_updates, strict=True):
        shadow = pool.client_data(task.client_id)  # the server's best case: the client's very records
        with thread_limit(1):  # as the pool ran the client: same float reductions
            noisy = local_update(shadow, state, task, ctx).images
            replayed_update = local_update(shadow, state, task, plain_ctx).images - start
        noise = noisy - start - clip(replayed_update)
        recovered = answer.images - start - noise
        error = recovered - clip(update)
        assert float(error.abs().max()) > 1.0  # old code: < 1e-5
        assert 0.6 < float(error.std()) < 0.8  # two independent N(0, (sigma C)^2) draws: sqrt(2) x 0.5


def test_a_task_carries_nothing_that_seeds_the_client():
    assert not [f.name for f in dataclasses.fields(ClientTask) if "seed" in f.name]


def test_two_runs_of_one_localdp_round_release_different_noise_unless_debugging():
    train = data.load("digits", "train")
    cfg = SFDDConfig(**{**TINY, "outer_loop": 1, "inner_loop": 0}, n_clients=2, rounds=1, defence="localdp",
                     localdp_sigma=SIGMA, localdp_clip=CLIP)
    ctx = ClientContext(cfg, INFO.mean, INFO.std)
    init = initial_set(cfg, 10, (1, 8, 8), 0, mean=INFO.mean, std=INFO.std)
    part = two_clients(train)

    def release(noise):
        return run_sfdd(LocalPool(train, part, ctx, noise=noise), init, cfg, seed=0).synthetic.images.detach()

    assert not torch.equal(release(None), release(None))
    assert not torch.equal(release(PrivacyRandomness.secret()), release(PrivacyRandomness.secret()))
    assert torch.equal(release(PrivacyRandomness.reproducible(1)), release(PrivacyRandomness.reproducible(1)))
