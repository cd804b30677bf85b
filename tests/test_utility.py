"""The utility protocol on scikit-learn's digits: it learns, it is deterministic, and it cannot learn noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dpdistill import models
from dpdistill.errors import DataError, SpecError
from dpdistill.evaluation.training import NormalisedDSA, dsa_lite, resolve_augment, thread_limit
from dpdistill.evaluation.utility import UtilityResult, accuracy, evaluate_utility, train_classifier

# Small but well inside what the full protocol does: 20 epochs of batch 32 on a width-32 ConvNet.
FAST = dict(
    num_classes=10, model="convnet", model_kwargs={"width": 32}, epochs=20, batch_size=32, progress=False
)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=data.target, random_state=0
    )
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def two_seeds(digits) -> UtilityResult:
    return evaluate_utility(*digits, seeds=(0, 1), **FAST)


def test_convnet_learns_digits(two_seeds: UtilityResult, digits) -> None:
    assert two_seeds.mean >= 0.95, two_seeds
    assert len(two_seeds.accuracies) == 2
    assert two_seeds.mean == pytest.approx(float(np.mean(two_seeds.accuracies)))
    assert two_seeds.std == pytest.approx(float(np.std(two_seeds.accuracies)))
    assert (two_seeds.model, two_seeds.epochs, two_seeds.n_train) == ("convnet", 20, len(digits[0]))
    assert two_seeds.as_metrics("utility") == {"utility_mean": two_seeds.mean, "utility_std": two_seeds.std}


def test_same_seed_same_accuracy_and_global_state_untouched(two_seeds: UtilityResult, digits) -> None:
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    again = evaluate_utility(*digits, seeds=(1,), **FAST)
    assert again.accuracies == [two_seeds.accuracies[1]]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before


def test_shuffled_labels_stay_near_chance(digits) -> None:
    x_train, y_train, x_test, y_test = digits
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    result = evaluate_utility(x_train, shuffled, x_test, y_test, seeds=(0,), **FAST)
    assert result.mean < 0.25, result


def test_augmentation_and_normalisation_still_learn(digits) -> None:
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = models.get("convnet", channels=1, num_classes=10, image_size=8, width=32)
    train_classifier(
        model,
        x_train,
        y_train,
        epochs=20,
        batch_size=32,
        augment="dsa-lite",
        mean=0.3,
        std=0.4,
        generator=torch.Generator().manual_seed(0),
    )
    # A one-pixel shift is an eighth of a digits image, so augmentation costs accuracy here (0.89 measured).
    assert accuracy(model, x_test, y_test, mean=0.3, std=0.4) >= 0.8
    # The same weights without the normalisation they were trained with do worse: mean/std are really applied.
    assert accuracy(model, x_test, y_test) < accuracy(model, x_test, y_test, mean=0.3, std=0.4)


def test_dsa_lite_is_seeded_and_keeps_shape_and_range() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = dsa_lite(x, torch.Generator().manual_seed(5))
    b = dsa_lite(x, torch.Generator().manual_seed(5))
    c = dsa_lite(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)


def test_dsa_evaluation_augmentation_is_per_image_seeded_and_runs_after_normalisation(digits) -> None:
    aug = resolve_augment("dsa")
    assert isinstance(aug, NormalisedDSA) and aug.on_normalised
    x = torch.randn(32, 1, 16, 16)
    a, b = aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    # Per image, not Siamese: across many draws, some batch has images transformed differently from each other.
    twins = torch.cat([x[:1]] * 8)
    assert any(not torch.allclose(out[0], out[1]) for out in
               (aug(twins, torch.Generator().manual_seed(s)) for s in range(10)))
    # The training loop hands a NORMALISED batch to an on_normalised augmentation and a [0,1] batch otherwise.
    x_train, y_train, _, _ = digits
    seen: dict[str, float] = {}

    class Probe:
        on_normalised = True

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            seen["min"] = min(seen.get("min", 0.0), float(images.min()))
            return images

    model = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8)
    train_classifier(model, x_train, y_train, epochs=1, batch_size=64, augment=Probe(), mean=0.5, std=0.25)
    assert seen["min"] < -1.0  # (0 - 0.5) / 0.25 = -2: normalised, not [0, 1]
    train_classifier(model, x_train, y_train, epochs=1, batch_size=64, augment="dsa", mean=0.3, std=0.4)


def test_dsa_lite_without_rotation_is_a_zero_filled_shift_of_at_most_size_over_8() -> None:
    x = torch.rand(32, 1, 16, 16)
    out = dsa_lite(x, torch.Generator().manual_seed(0), max_degrees=0.0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        crops = [
            padded[i, :, 2 + dy : 18 + dy, 2 + dx : 18 + dx] for dy in range(-2, 3) for dx in range(-2, 3)
        ]
        assert any(torch.allclose(out[i], crop, atol=1e-5) for crop in crops), i


def test_soft_labels_and_custom_augment_are_accepted(digits, capsys: pytest.CaptureFixture[str]) -> None:
    x_train, y_train, x_test, y_test = digits
    calls: list[int] = []

    def flip(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images

    soft = torch.nn.functional.one_hot(y_train[:100], 10).float()
    result = evaluate_utility(
        x_train[:100],
        soft,
        x_test,
        y_test,
        num_classes=10,
        model="lenet",
        seeds=(0,),
        epochs=1,
        batch_size=50,
        augment=flip,
        progress=True,
    )
    assert calls == [50, 50] and 0.0 <= result.mean <= 1.0
    # progress=True draws a bar only on a terminal: captured output must stay clean.
    assert capsys.readouterr().out == ""


def test_thread_limit_restores() -> None:
    before = torch.get_num_threads()
    with thread_limit(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_inputs_raise_one_line_errors(digits) -> None:
    x_train, y_train, x_test, y_test = digits
    with pytest.raises(DataError, match="train_labels: has 10 labels for 1437 images"):
        evaluate_utility(x_train, y_train[:10], x_test, y_test, num_classes=10, progress=False)
    with pytest.raises(DataError, match=r"test_labels: labels must lie in \[0, 4\]"):
        evaluate_utility(x_train, y_train % 5, x_test, y_test, num_classes=5, progress=False)
    with pytest.raises(DataError, match=r"train_images: expected a float tensor \[N, C, H, W\]"):
        evaluate_utility(x_train[:, 0], y_train, x_test, y_test, num_classes=10, progress=False)
    with pytest.raises(SpecError, match="unknown option 'wdth'"):
        evaluate_utility(
            x_train, y_train, x_test, y_test, num_classes=10, model_kwargs={"wdth": 3}, progress=False
        )
    with pytest.raises(SpecError, match="augment must be None, 'dsa-lite', 'dsa' or a callable"):
        evaluate_utility(x_train, y_train, x_test, y_test, num_classes=10, augment="autoaugment", progress=False)


@pytest.mark.parametrize("value,name", [(False, None), (True, "dsa-lite"), ("dsa-lite", "dsa-lite"), ("dsa", "dsa")])
def test_evaluation_spec_names_the_augmentation_it_asks_for(value, name) -> None:
    from dpdistill.spec import EvaluationSpec

    assert EvaluationSpec(augment=value).augmentation() == name
    assert name is None or resolve_augment(name) is not None


def test_every_augmentation_the_spec_accepts_is_one_training_knows() -> None:
    from dpdistill.spec import EVAL_AUGMENTATIONS

    assert all(resolve_augment(name) is not None for name in EVAL_AUGMENTATIONS)


@pytest.mark.parametrize("n", [17, 33, 16, 2])
def test_a_lone_last_sample_joins_the_previous_batch(n: int) -> None:
    """n = k·batch + 1 used to crash (IndexError) when the lone sample was folded in; every sample is still
    drawn exactly once per epoch, and no batch has a single sample (BatchNorm in train mode)."""
    from dpdistill.evaluation.training import _batches

    chunks = _batches(n, 16, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))
    assert all(len(c) > 1 for c in chunks) or n == 1
    net = models.get("convnet", channels=1, num_classes=10, image_size=8, width=8, depth=1)
    x, y = torch.rand(n, 1, 8, 8), torch.arange(n) % 10
    train_classifier(net, x, y, epochs=1, batch_size=16, lr=0.01)  # whole path: no crash at n = 17
