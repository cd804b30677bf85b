"""Generation as parallel Ray tasks (runtime/generation.py): the same images as the in-process path, chunk for
chunk, whatever the scheduling; every class gets its count; what travels is the release, and it charges nothing."""

from __future__ import annotations

import pytest
import torch

from dpdistill import data, synthesis
from dpdistill.privacy import PrivacyLedger
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.runtime.generation import chunk_seed, generate_parallel, label_chunks


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fitted():
    digits = data.load("digits", "train")
    synth = synthesis.create("dp-merf", channels=1, image_size=digits.image_size, num_classes=10, seed=3,
                             noise=PrivacyRandomness.reproducible(5), iterations=5, num_features=200)
    ledger = PrivacyLedger(None, 1.0, 1e-5)
    synth.fit(digits, ledger)
    return synth, ledger


def test_label_chunks_cover_every_class_in_order() -> None:
    pieces = label_chunks(10, 7, 4)
    labels = torch.cat(pieces)
    assert len(pieces) == 4 and labels.tolist() == torch.arange(10).repeat_interleave(7).tolist()
    assert len(label_chunks(2, 1, 8)) == 2  # never an empty chunk


def test_ray_tasks_give_the_in_process_images_and_charge_nothing(ray_cluster, fitted) -> None:
    synth, ledger = fitted
    entries = ledger.entries
    on_ray, labels = generate_parallel(synth, 6, seed=11, chunks=3, use_ray=True)
    here, labels_here = generate_parallel(synth, 6, seed=11, chunks=3, use_ray=False)
    assert torch.equal(labels, labels_here) and torch.bincount(labels).tolist() == [6] * 10
    assert torch.equal(on_ray, here)  # exact: same chunks, same seeds, same state
    assert ledger.entries == entries
    # The chunk seeds are what they claim: chunk 1 is generate(labels of chunk 1, seed=chunk_seed(11, 1)).
    chunk1 = label_chunks(10, 6, 3)[1]
    assert torch.equal(synth.generate(chunk1, seed=chunk_seed(11, 1))[0], here[len(label_chunks(10, 6, 3)[0]):][
        : len(chunk1)])
    # Another seed, other images (the test can fail if seeds were ignored).
    assert not torch.equal(generate_parallel(synth, 6, seed=12, chunks=3, use_ray=False)[0], here)


def test_an_unfitted_synthesiser_is_refused() -> None:
    synth = synthesis.create("dp-merf", channels=1, image_size=8, num_classes=10, seed=0)
    with pytest.raises(Exception, match="after fit"):
        generate_parallel(synth, 2, seed=0, chunks=2, use_ray=False)
