"""The DP-SGD engine (training/dp_sgd.py) in one process: what it clips, what noise it adds, where the noise
comes from, and what it leaves alone. No Ray here (tests/test_dp_train_ray.py runs it sharded)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dp_objectives import ZeroGradient, noise_gain
from dpdistill.errors import PrivacyError, SpecError
from dpdistill.privacy.dp_ops import clip_tensor
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.runtime.dp_train import fit_dp_sgd
from dpdistill.training.dp_sgd import (
    ClassifierObjective,
    DPSGDSchedule,
    attach_grad_sampler,
    clipped_gradient_sum,
    train_dp_sgd,
)


@dataclass(frozen=True)
class Regression:
    """A frozen first layer, a trainable second one; squared error to the one-hot label, row k scaled by
    (1 + k * row_spread) so a record's K rows differ when row_spread > 0."""

    d: int = 6
    m: int = 3
    row_spread: float = 0.0
    seed: int = 0

    def build(self) -> nn.Module:
        g = torch.Generator().manual_seed(self.seed)
        net = nn.Sequential(nn.Linear(self.d, self.d), nn.Tanh(), nn.Linear(self.d, self.m))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return net

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        return list(net[2].parameters())

    def losses(self, net, images, labels, multiplicity, generator):
        x = images.flatten(1).repeat_interleave(multiplicity, 0)
        scale = 1 + self.row_spread * torch.arange(multiplicity, dtype=x.dtype).repeat(len(images))
        target = F.one_hot(labels.long(), self.m).to(x.dtype).repeat_interleave(multiplicity, 0)
        return 0.5 * (net(x * scale[:, None]) - target).pow(2).sum(1)


def _data(n: int, d: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _sum(objective, images, labels, clip, k=1):
    net = objective.build()
    params = objective.trainable(net)
    for p in net.parameters():
        p.requires_grad_(any(p is q for q in params))
    sampler = attach_grad_sampler(net)
    try:
        return clipped_gradient_sum(objective, net, params, images, labels, k, clip, torch.Generator())
    finally:
        sampler.remove_hooks()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_one_record_moves_the_clipped_sum_by_at_most_C():
    """Sensitivity: adding a record whose gradient is huge in BOTH trainable tensors moves the sum by ≤ C, and
    by about C (it is clipped, not dropped). Clipping each tensor separately would move it by √2·C; no
    clipping by far more — either fails the first assertion."""
    obj, clip = Regression(), 0.2
    x, y = _data(20, obj.d)
    huge_x = torch.full((1, obj.d), 50.0)
    with_huge = _sum(obj, torch.cat([x, huge_x]), torch.cat([y, torch.tensor([0])]), clip)
    without = _sum(obj, x, y, clip)
    moved = float((_flat(with_huge) - _flat(without)).norm())
    assert moved <= clip * (1 + 1e-5)
    assert moved >= clip * 0.999
    # Control: the huge record's own gradient is outside the ball in each tensor (weight and bias) alone.
    alone = _sum(obj, huge_x, torch.tensor([0]), clip=1e9)
    assert min(float(t.norm()) for t in alone) > 5 * clip


def test_rows_of_a_record_are_averaged_before_clipping():
    """The engine's clipped sum equals Σ_i clip_C(mean_k ∇loss_ik) computed row by row with plain autograd;
    clipping each row before averaging gives a clearly different sum (the control)."""
    obj, clip, k = Regression(row_spread=2.0), 0.3, 3
    x, y = _data(5, obj.d)
    engine = _flat(_sum(obj, x, y, clip, k))

    net = obj.build()
    params = obj.trainable(net)
    mean_then_clip, clip_then_mean = torch.zeros_like(engine), torch.zeros_like(engine)
    for i in range(len(x)):
        rows = obj.losses(net, x[i:i + 1], y[i:i + 1], k, torch.Generator())
        grads = [_flat(torch.autograd.grad(rows[j], params, retain_graph=True)) for j in range(k)]
        mean_then_clip += clip_tensor(torch.stack(grads).mean(0), clip)
        clip_then_mean += torch.stack([clip_tensor(g, clip) for g in grads]).mean(0)
    torch.testing.assert_close(engine, mean_then_clip, rtol=1e-5, atol=1e-6)
    assert float((clip_then_mean - mean_then_clip).norm()) > 0.05 * float(mean_then_clip.norm())


def test_cpu_chunks_give_the_one_pass_sum_and_never_split_a_record(monkeypatch):
    """On CPU the engine splits a batch into chunks of at most CPU_CHUNK_ROWS rows (speed only): 50 records x
    K = 3 rows, with 7-row chunks, go through in chunks of two whole records (6 rows; a record's rows are never
    split, which would clip partial means) and give the one-pass clipped sum (a spy counts the chunks)."""
    import dpdistill.training.dp_sgd as dp_sgd

    obj, clip, k = Regression(row_spread=2.0), 0.3, 3
    x, y = _data(50, obj.d)
    one_pass = _flat(_sum(obj, x, y, clip, k))
    monkeypatch.setattr(dp_sgd, "CPU_CHUNK_ROWS", 7)
    seen: list[int] = []
    real = dp_sgd.hooks_clipped_sum

    def counting(objective, net, params, xs, ys, kk, c, g):
        seen.append(len(xs))
        return real(objective, net, params, xs, ys, kk, c, g)

    monkeypatch.setattr(dp_sgd, "hooks_clipped_sum", counting)
    chunked = _flat(_sum(obj, x, y, clip, k))
    assert seen == [2] * 25  # 7 rows hold two whole records of 3 rows
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6)


def _schedule(**kw) -> DPSGDSchedule:
    base = dict(sigma=1.0, q=0.25, steps=6, clip=0.5, n_records=40, lr=0.05, optimizer="sgd")
    return DPSGDSchedule(**{**base, **kw})


def test_multiplicity_of_identical_rows_gives_the_update_of_one_row():
    """K identical rows per record average to that row's gradient: the same trained state as K = 1 under the
    same (reproducible) noise. Summing the K rows instead would scale unclipped gradients by K. The clip is
    large enough that some records are not clipped (so a sum would show)."""
    obj = Regression()
    x, y = _data(40, obj.d)
    one = train_dp_sgd(obj, None, x, y, _schedule(clip=2.0), PrivacyRandomness.reproducible(3))
    three = train_dp_sgd(obj, None, x, y, _schedule(clip=2.0, multiplicity=3), PrivacyRandomness.reproducible(3))
    for name in one:
        torch.testing.assert_close(one[name], three[name], rtol=1e-5, atol=1e-6)
    start = obj.build().state_dict()
    assert not torch.equal(one["2.weight"], start["2.weight"])  # it trained


def test_noise_std_of_the_update_is_sigma_C_over_expected_batch():
    """Zero per-sample gradients, SGD with lr 1: after T steps each coordinate moved by the sum of T noise
    draws / (q·n), std √T·σ·C/(q·n). 10,100 coordinates: the empirical std is within 5 % (noise added once per
    step; twice would be √2 too large, none zero)."""
    obj = ZeroGradient()
    sched = DPSGDSchedule(sigma=1.3, q=0.2, steps=8, clip=0.7, n_records=60, lr=1.0, optimizer="sgd")
    x, y = _data(60, obj.d)
    final = train_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(11))
    start = obj.build().state_dict()
    moved = torch.cat([(final[k] - start[k]).reshape(-1) for k in start])
    expected = math.sqrt(sched.steps) * sched.sigma * sched.clip / (sched.q * sched.n_records)
    assert abs(float(moved.std()) / expected - 1) < 0.05
    assert abs(float(moved.mean())) < 0.05 * expected


def _noise_moves(steps: int, **schedule) -> torch.Tensor:
    """How far SGD at lr 1 moves a ZeroGradient model's weights in ``steps`` steps: the noise alone, from the same
    reproducible draws z1, z2, ... whatever the schedule (so runs of different lengths share their first draws)."""
    obj = ZeroGradient()
    x, y = _data(60, obj.d)
    start = obj.build().state_dict()
    sched = DPSGDSchedule(sigma=1.0, q=0.2, steps=steps, clip=1.0, n_records=60, lr=1.0, optimizer="sgd", **schedule)
    final = train_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(5))
    return torch.cat([(final[k] - start[k]).reshape(-1) for k in start])


def test_sgd_momentum_acts_on_the_noisy_averaged_updates():
    """Zero per-sample gradients, lr 1, the same reproducible draws z1, z2: two plain steps move the weights by
    z1 + z2, two steps with momentum β by (1 + β) z1 + z2 (heavy ball on the noisy mean; nothing else changes)."""
    z1 = _noise_moves(1)
    z2 = _noise_moves(2) - z1
    assert torch.allclose(_noise_moves(2, momentum=0.9), 1.9 * z1 + z2, atol=1e-5)
    assert not torch.allclose(_noise_moves(2, momentum=0.9), z1 + z2, atol=1e-3)


def test_a_cosine_lr_scales_each_steps_update():
    """Zero per-sample gradients, SGD, the same reproducible draws z1, z2, z3 (read off constant-lr runs of 1, 2
    and 3 steps): a cosine schedule over 3 steps moves the weights by Σ lr_t z_t with lr_t = (1 + cos(π t/3))/2,
    i.e. 1, 0.75, 0.25 — not by z1 + z2 + z3 (no schedule) nor with the curve shifted by a step."""
    one, two, three = _noise_moves(1), _noise_moves(2), _noise_moves(3)
    z = [one, two - one, three - two]
    sched = DPSGDSchedule(sigma=1.0, q=0.2, steps=3, clip=1.0, n_records=60, lr=1.0, lr_schedule="cosine")
    assert [sched.lr_at(t) for t in range(3)] == pytest.approx([1.0, 0.75, 0.25])
    cosine = _noise_moves(3, lr_schedule="cosine")
    assert torch.allclose(cosine, z[0] + 0.75 * z[1] + 0.25 * z[2], atol=1e-5)
    assert not torch.allclose(cosine, three, atol=1e-3)
    assert not torch.allclose(cosine, 0.75 * z[0] + 0.25 * z[1], atol=1e-3)
    with pytest.raises(SpecError, match="lr_schedule"):
        DPSGDSchedule(sigma=1.0, q=0.2, steps=3, clip=1.0, n_records=60, lr_schedule="linear")


def _checkpoints(obj, x, y, sched) -> dict[int, dict]:
    """The checkpoints of an uninterrupted fit under reproducible(4) noise, by step."""
    states: dict[int, dict] = {}
    train_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(4),
                 on_checkpoint=lambda step, st: states.setdefault(step, st))
    return states


def _interrupted_and_resumed(obj, x, y, sched, storage, seen: list[int] | None = None) -> dict:
    """A fit under reproducible(4) noise with storage ``storage`` that raises after step 3, then the same call
    resumed to the end; ``seen`` collects the step numbers of both attempts."""

    class Stop(Exception):
        pass

    def record(step, info):
        if seen is not None:
            seen.append(step)

    def stop_after_3(step, info):
        record(step, info)
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(4), storage_path=storage,
                   run_name="a", on_step=stop_after_3)
    return fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(4), storage_path=storage,
                      run_name="a", on_step=record)


def test_the_release_is_the_moving_average_of_the_iterates():
    """ema_decay > 0: the fit returns e_3 of the iterates w_t = w_0 + z_1 + ... + z_t (zero per-sample gradients,
    SGD lr 1, the same reproducible draws), e_0 = w_0 and e_t = d_t·e_{t-1} + (1 - d_t)·w_t with the warmed-up
    decay d_t = min(0.99, t / (9 + t)) = 0.1, 2/11, 3/12 — not the last iterate, not a plain mean, not a
    decay without warm-up (0.99 would leave e_3 ≈ w_0). The update's noise is still in it (it moved)."""
    one, two, three = _noise_moves(1), _noise_moves(2), _noise_moves(3)
    sched = DPSGDSchedule(sigma=1.0, q=0.2, steps=3, clip=1.0, n_records=60, lr=1.0, ema_decay=0.99)
    assert [sched.ema_decay_at(t) for t in range(3)] == pytest.approx([0.1, 2 / 11, 3 / 12])
    e = torch.zeros_like(one)  # moves relative to w_0
    for d, w in zip((0.1, 2 / 11, 3 / 12), (one, two, three), strict=True):
        e = d * e + (1 - d) * w
    released = _noise_moves(3, ema_decay=0.99)
    assert torch.allclose(released, e, atol=1e-5)
    assert not torch.allclose(released, three, atol=1e-3)
    assert not torch.allclose(released, (one + two + three) / 3, atol=1e-3)
    assert float(released.abs().mean()) > 0.1 * float(three.abs().mean())


def test_the_moving_average_keeps_the_noise_std_it_should():
    """Zero per-sample gradients, SGD lr 1, 12 steps, ema_decay 0.8: each coordinate of the release moved by
    noise_gain(schedule)·σC/(q·n) in std (10,100 coordinates, within 5 %): gain 3.17 against √12 = 3.46 for the
    last iterate (8 % apart: releasing the last iterate fails), and never noiseless. On a random walk (no
    gradient pulls the weights back) a warmed-up average removes little noise (a few to 8 % of the std); where
    a loss holds the iterates near a minimum it averages their scatter away."""
    obj = ZeroGradient()
    sched = DPSGDSchedule(sigma=1.3, q=0.2, steps=12, clip=0.7, n_records=60, lr=1.0, optimizer="sgd",
                          ema_decay=0.8)
    x, y = _data(60, obj.d)
    final = train_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(11))
    start = obj.build().state_dict()
    moved = torch.cat([(final[k] - start[k]).reshape(-1) for k in start])
    expected = noise_gain(sched) * sched.noise_std / sched.expected_batch
    assert noise_gain(sched) < 0.93 * math.sqrt(sched.steps)
    assert abs(float(moved.std()) / expected - 1) < 0.05, (float(moved.std()), expected)


@pytest.mark.parametrize("steps", [4, 5])
def test_a_resumed_fit_continues_the_moving_average(tmp_path, steps):
    """A fit interrupted after its step-2 checkpoint resumes the average saved there (not a new one from the
    resumed weights): it ends at the state of the same resumption done by hand with the checkpoint's "ema".
    Resuming an averaging schedule without the average is refused. A finished run's last checkpoint (at a
    checkpoint step, 4, or after one, 5) holds the release, so calling the fit again returns the average."""
    obj = Regression()
    x, y = _data(40, obj.d)
    sched = _schedule(optimizer="adam", steps=steps, checkpoint_every=2, ema_decay=0.9)
    resumed = _interrupted_and_resumed(obj, x, y, sched, tmp_path)
    states = _checkpoints(obj, x, y, sched)
    assert set(states[2]["ema"]) == {"2.weight", "2.bias"}  # the trainable parameters only
    by_hand = train_dp_sgd(obj, states[2]["net"], x, y, sched, PrivacyRandomness.reproducible(4).spawn("resume-2"),
                           start_step=2, optimizer_state=states[2]["optimizer"], ema_state=states[2]["ema"])
    restarted = train_dp_sgd(obj, states[2]["net"], x, y, sched,
                             PrivacyRandomness.reproducible(4).spawn("resume-2"), start_step=2,
                             optimizer_state=states[2]["optimizer"],
                             ema_state={k: states[2]["net"][k] for k in states[2]["ema"]})
    for name in by_hand:
        torch.testing.assert_close(resumed[name], by_hand[name])
    assert not torch.allclose(resumed["2.weight"], restarted["2.weight"], atol=1e-6)
    with pytest.raises(SpecError, match="moving average"):
        train_dp_sgd(obj, states[2]["net"], x, y, sched, PrivacyRandomness.reproducible(4), start_step=2,
                     optimizer_state=states[2]["optimizer"])
    again = fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.secret(), storage_path=tmp_path, run_name="a")
    for name in resumed:
        assert torch.equal(resumed[name], again[name])
    last = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert torch.equal(last["net"]["2.weight"], resumed["2.weight"])


def test_a_checkpoint_from_before_a_schedule_field_existed_resumes(tmp_path):
    """A checkpoint whose schedule lacks a field added since (here ema_decay) is read with the field at its
    default: the interrupted fit resumes instead of being refused as another schedule's."""
    obj = Regression()
    x, y = _data(40, obj.d)
    sched = _schedule(optimizer="adam", steps=4, checkpoint_every=2)
    states = _checkpoints(obj, x, y, sched)
    old = {k: v for k, v in states[2].items() if k != "ema"}
    old["schedule"] = {k: v for k, v in old["schedule"].items() if k != "ema_decay"}
    (tmp_path / "a").mkdir()
    torch.save(old, tmp_path / "a" / "state.pt")
    seen: list[int] = []
    fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.secret(), storage_path=tmp_path, run_name="a",
               on_step=lambda step, info: seen.append(step))
    assert seen == [3, 4]
    with pytest.raises(PrivacyError, match="another schedule"):  # not the same schedule with the field set
        fit_dp_sgd(obj, None, x, y, _schedule(optimizer="adam", steps=4, checkpoint_every=2, ema_decay=0.5),
                   PrivacyRandomness.secret(), storage_path=tmp_path, run_name="a")


@pytest.mark.parametrize("bad", [1.0, -0.1, True])
def test_a_bad_ema_decay_is_refused(bad):
    with pytest.raises(SpecError, match="ema_decay"):
        _schedule(ema_decay=bad)


@pytest.mark.parametrize("bad", [{"momentum": 1.0}, {"momentum": -0.1}, {"momentum": 0.5, "optimizer": "adam"}])
def test_bad_momentum_is_refused(bad):
    from dpdistill.errors import SpecError

    with pytest.raises(SpecError, match="momentum"):
        DPSGDSchedule(**{"sigma": 1.0, "q": 0.1, "steps": 1, "clip": 1.0, "n_records": 10, "optimizer": "sgd",
                         **bad})


def test_noise_comes_from_the_privacy_source():
    """Two reproducible sources with the same seed give the same state; a different seed and a secret source
    give different ones (the noise, the sampling and the objective's generator all come from the source)."""
    obj = Regression()
    x, y = _data(40, obj.d)

    def run(noise):
        return train_dp_sgd(obj, None, x, y, _schedule(), noise)["2.weight"]

    a, b = run(PrivacyRandomness.reproducible(5)), run(PrivacyRandomness.reproducible(5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, run(PrivacyRandomness.reproducible(6)))
    assert not torch.allclose(a, run(PrivacyRandomness.secret()))
    assert not torch.allclose(run(PrivacyRandomness.secret()), run(PrivacyRandomness.secret()))


def test_the_poisson_sample_comes_from_the_privacy_source():
    """At a negligible σ the trained state is a function of which records were sampled: two secret sources
    give clearly different states (a sample from a seeded generator would give the same one), two
    reproducible sources with one seed the same state."""
    obj = Regression()
    x, y = _data(40, obj.d)

    def run(noise):
        return train_dp_sgd(obj, None, x, y, _schedule(sigma=1e-6, lr=0.5), noise)["2.weight"]

    assert torch.equal(run(PrivacyRandomness.reproducible(5)), run(PrivacyRandomness.reproducible(5)))
    a, b = run(PrivacyRandomness.secret()), run(PrivacyRandomness.secret())
    assert float((a - b).abs().max()) > 1e-3


def test_one_gaussian_draw_per_step_through_the_guarded_path():
    """Every step's noise is one PrivacyRandomness.gaussian call of std σ·C over all trainable coordinates."""
    draws = []

    class Counting(PrivacyRandomness):
        def gaussian(self, shape, std, device="cpu", dtype=torch.float32):
            draws.append((tuple(shape), std))
            return super().gaussian(shape, std, device, dtype)

    obj = Regression()
    x, y = _data(40, obj.d)
    sched = _schedule()
    train_dp_sgd(obj, None, x, y, sched, Counting("reproducible", 1))
    assert draws == [((obj.d * obj.m + obj.m,), sched.sigma * sched.clip)] * sched.steps


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_non_trainable_parameters_stay_bit_identical(optimizer):
    """Only what trainable() names changes (weight decay too acts on the trainable parameters only)."""
    obj = Regression()
    x, y = _data(40, obj.d)
    final = train_dp_sgd(obj, None, x, y, _schedule(optimizer=optimizer, weight_decay=0.1),
                         PrivacyRandomness.reproducible(2))
    start = obj.build().state_dict()
    assert torch.equal(final["0.weight"], start["0.weight"]) and torch.equal(final["0.bias"], start["0.bias"])
    assert not torch.equal(final["2.weight"], start["2.weight"])


def test_checkpoints_resume_to_the_same_state(tmp_path):
    """An in-process fit interrupted after a checkpoint and resumed ends at the uninterrupted fit's state
    (reproducible noise; the resumed part draws from its own child stream, so compare with a run that
    resumed at the same step). Also: a checkpoint of another schedule is refused."""
    obj = Regression()
    x, y = _data(40, obj.d)
    sched = _schedule(optimizer="adam", steps=6, checkpoint_every=2)
    seen: list[int] = []
    resumed = _interrupted_and_resumed(obj, x, y, sched, tmp_path, seen)
    assert seen == [1, 2, 3, 3, 4, 5, 6]  # resumed from the checkpoint at step 2: no step lost, none extra

    # The same resumption done by hand from a fresh run's checkpoint gives the same state.
    states = _checkpoints(obj, x, y, sched)
    by_hand = train_dp_sgd(obj, states[2]["net"], x, y, sched, PrivacyRandomness.reproducible(4).spawn("resume-2"),
                           start_step=2, optimizer_state=states[2]["optimizer"])
    for name in by_hand:
        torch.testing.assert_close(resumed[name], by_hand[name])
    with pytest.raises(PrivacyError, match="another schedule"):
        fit_dp_sgd(obj, None, x, y, _schedule(steps=8, checkpoint_every=2), PrivacyRandomness.reproducible(4),
                   storage_path=tmp_path, run_name="a")


def test_a_data_set_of_another_size_than_planned_is_refused():
    obj = Regression()
    x, y = _data(30, obj.d)
    with pytest.raises(PrivacyError, match="n_records=40"):
        train_dp_sgd(obj, None, x, y, _schedule(), PrivacyRandomness.reproducible(1))


def test_a_convnet_classifier_trains():
    """The registry's ConvNet (in-place ReLUs, GroupNorm) under opacus' hooks: the loss drops on an easy task
    at a small σ (the engine is a working trainer, not only a noise adder)."""
    obj = ClassifierObjective(model="convnet", channels=1, num_classes=2, image_size=8,
                              options=(("width", 8), ("depth", 1)))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    x = torch.randn(200, 1, 8, 8, generator=g) * 0.3 + (y.float() * 2 - 1)[:, None, None, None]
    sched = DPSGDSchedule(sigma=0.3, q=0.25, steps=30, clip=1.0, n_records=200, lr=0.01)
    state = train_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.reproducible(0))
    net = obj.build()
    with torch.no_grad():
        before = float(F.cross_entropy(net(x), y))
        net.load_state_dict(state)
        after = float(F.cross_entropy(net(x), y))
    assert after < 0.5 * before


def test_on_step_gets_public_information_only():
    """What a progress hook sees: step numbers, the rank and wall time; no loss, no batch size."""
    obj = Regression()
    x, y = _data(40, obj.d)
    infos = []
    train_dp_sgd(obj, None, x, y, _schedule(steps=3), PrivacyRandomness.reproducible(1),
                 on_step=lambda step, info: infos.append((step, info)))
    assert [s for s, _ in infos] == [1, 2, 3]
    assert all(set(info) == {"step", "steps", "rank", "elapsed_s"} for _, info in infos)


def test_a_finished_fit_called_again_returns_its_release(tmp_path):
    """With a storage path the finished run is recorded (here 5 steps, checkpoints every 2): calling again
    returns the same state and trains nothing, instead of redoing step 5 from the step-4 checkpoint (a
    second, differently noised release of the same data)."""
    obj = Regression()
    x, y = _data(40, obj.d)
    sched = _schedule(steps=5, checkpoint_every=2)
    first = fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.secret(), storage_path=tmp_path, run_name="r")
    steps: list[int] = []
    again = fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.secret(), storage_path=tmp_path, run_name="r",
                       on_step=lambda step, info: steps.append(step))
    assert steps == []
    for name in first:
        assert torch.equal(first[name], again[name])


def test_a_cuda_objective_on_cpu_workers_is_refused():
    """Before any Ray call: Ray Train workers that reserve no GPU cannot train a cuda objective."""
    from dpdistill.errors import SpecError

    obj = ClassifierObjective(device="cuda")
    x, y = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    sched = DPSGDSchedule(sigma=1.0, q=0.5, steps=1, clip=1.0, n_records=4)
    with pytest.raises(SpecError, match="use_gpu"):
        fit_dp_sgd(obj, None, x, y, sched, PrivacyRandomness.secret(), executor="ray-train", num_workers=2)


def test_a_rank_outside_the_world_is_refused():
    """Rank 0 adds the noise: a single worker told it is rank 1 would train without any."""
    obj = Regression()
    x, y = _data(40, obj.d)
    with pytest.raises(PrivacyError, match="rank 1 of world size 1"):
        train_dp_sgd(obj, None, x, y, _schedule(), PrivacyRandomness.secret(), rank=1)
