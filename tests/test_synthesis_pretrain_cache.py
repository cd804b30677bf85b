"""The public pre-training cache of the mean-embedding synthesisers (synthesis/cache.py).

What would catch it being wrong: a hit that leaves a different generator or extractor than training would (the
cache must be invisible in the result), a key that ignores something that changes the result (config, seed,
public images), a hit that still trains, an entry written from a fitted synthesiser (its extra state holds a
release), and a job that does not use it.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpdistill import data, synthesis
from dpdistill.synthesis import cache

TINY = dict(num_features=64, iterations=3, pretrain_iterations=3, batch_size=40, extractor_width=8,
            extractor_depth=2, extractor_epochs=1, embed_batch_size=256, gen_hidden=32)


@pytest.fixture(scope="module")
def glyphs():
    return data.load("glyphs", "train", image_size=8).subset(torch.arange(600))


def _mepf(seed: int = 0, **options):
    return synthesis.create("dp-mepf", channels=1, image_size=8, num_classes=10, seed=seed, **(TINY | options))


def _state(synth) -> dict:
    return {"generator": synth.generator_state(), "extractor": synth.extractor_state,
            "stats": synth.extractor_stats, "training": synth.generator_net.training}


def _same(a: dict, b: dict) -> bool:
    return (a["training"] == b["training"] and a["stats"] == b["stats"]
            and all(torch.equal(a[part][k], b[part][k]) for part in ("generator", "extractor") for k in a[part])
            and a["generator"].keys() == b["generator"].keys() and a["extractor"].keys() == b["extractor"].keys())


def test_a_hit_restores_exactly_what_pretraining_leaves_and_does_not_train(tmp_path, glyphs, monkeypatch):
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    plain = _mepf()
    assert plain.pretrain(glyphs) is False  # no cache asked: trains
    # The premise of caching: pre-training is a function of its inputs (a second uncached run is identical).
    again = _mepf()
    again.pretrain(glyphs)
    assert _same(_state(plain), _state(again))

    first = _mepf()
    assert first.pretrain(glyphs, cache=True) is False  # a miss trains and stores
    assert _same(_state(first), _state(plain))
    (entry,) = (p for p in (tmp_path / cache.SYNTH_PRETRAIN_DIR).iterdir() if not p.name.startswith("."))
    meta = json.loads((entry / cache.SYNTH_META_FILE).read_text())
    assert meta["inputs"]["public_set"] == glyphs.name and meta["inputs"]["seed"] == 0

    hit = _mepf()
    calls = []
    monkeypatch.setattr(hit, "_pretrain", lambda *a, **k: calls.append(a))
    assert hit.pretrain(glyphs, cache=True) is True
    assert calls == [] and hit.pretrained_on == glyphs.name
    assert _same(_state(hit), _state(plain))
    # And it fits and generates like a trained one.
    from dpdistill.privacy import PrivacyLedger

    hit.fit(glyphs, PrivacyLedger(None, 5.0, 1e-5))
    images, labels = hit.generate(n_per_class=2, seed=0)
    assert images.shape == (20, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("change", ["seed", "config", "public"])
def test_anything_that_changes_the_result_changes_the_key(tmp_path, glyphs, change):
    base = cache.synth_pretrain_key(_mepf(), glyphs)[0]
    if change == "seed":
        key = cache.synth_pretrain_key(_mepf(seed=1), glyphs)[0]
    elif change == "config":
        key = cache.synth_pretrain_key(_mepf(pretrain_iterations=4), glyphs)[0]
    else:
        other = data.ImageSet(glyphs.images.flip(-1), glyphs.labels, glyphs.num_classes, glyphs.name)
        key = cache.synth_pretrain_key(_mepf(), other)[0]
    assert key != base
    assert cache.synth_pretrain_key(_mepf(), glyphs)[0] == base


def test_the_key_covers_the_package_source(tmp_path):
    """Any source change misses old entries: the fingerprint hashes every module's path and bytes."""
    import shutil
    from pathlib import Path

    import dpdistill

    package = Path(dpdistill.__file__).parent
    copy = tmp_path / "dpdistill"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert cache.source_fingerprint(copy) == cache.source_fingerprint() == cache.source_fingerprint(package)
    module = copy / "synthesis" / "dp_merf.py"
    module.write_bytes(module.read_bytes() + b"\n")
    assert cache.source_fingerprint(copy) != cache.source_fingerprint()
    module.rename(copy / "synthesis" / "dp_merf2.py")
    assert cache.source_fingerprint(copy) != cache.source_fingerprint()


def test_a_second_pretraining_keys_another_entry(tmp_path, glyphs, monkeypatch):
    """pre-training continues from the current weights: a synthesiser pre-trained once already must not store its
    twice-trained weights under a fresh synthesiser's key (a later fresh hit would restore them)."""
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    twice = _mepf()
    twice.pretrain(glyphs)
    assert cache.synth_pretrain_key(twice, glyphs)[0] != cache.synth_pretrain_key(_mepf(), glyphs)[0]
    assert twice.pretrain(glyphs, cache=True) is False
    fresh = _mepf()
    assert fresh.pretrain(glyphs, cache=True) is False  # a miss: the entry above is another key
    plain = _mepf()
    plain.pretrain(glyphs)
    assert _same(_state(fresh), _state(plain)) and not _same(_state(twice), _state(plain))


def test_a_damaged_entry_is_a_miss_and_is_replaced(tmp_path, glyphs, monkeypatch):
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    _mepf().pretrain(glyphs, cache=True)
    (entry,) = (p for p in (tmp_path / cache.SYNTH_PRETRAIN_DIR).iterdir() if not p.name.startswith("."))
    (entry / cache.SYNTH_STATE_FILE).write_bytes(b"truncated")
    again = _mepf()
    assert again.pretrain(glyphs, cache=True) is False
    plain = _mepf()
    plain.pretrain(glyphs)
    assert _same(_state(again), _state(plain))
    assert _mepf().pretrain(glyphs, cache=True) is True  # rewritten whole


def test_an_unwritable_cache_root_trains_uncached(tmp_path, glyphs, caplog, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("DPDISTILL_CACHE", str(blocked))
    synth = _mepf()
    assert synth.pretrain(glyphs, cache=True) is False
    plain = _mepf()
    plain.pretrain(glyphs)
    assert _same(_state(synth), _state(plain))
    assert "cache unavailable" in caplog.text


def test_a_failed_save_keeps_the_trained_synthesiser_and_trains_once(tmp_path, glyphs, monkeypatch, caplog):
    monkeypatch.setenv("DPDISTILL_CACHE", str(tmp_path))
    synth = _mepf()
    calls = []
    real = synth._pretrain
    monkeypatch.setattr(synth, "_pretrain", lambda *a: (calls.append(1), real(*a))[1])

    def full_disk(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file: No space left on device")

    monkeypatch.setattr(cache.torch, "save", full_disk)
    assert synth.pretrain(glyphs, cache=True) is False
    assert calls == [1] and "cache unavailable" in caplog.text
    monkeypatch.undo()
    plain = _mepf()
    plain.pretrain(glyphs)
    assert _same(_state(synth), _state(plain))
    assert not [p for p in (tmp_path / cache.SYNTH_PRETRAIN_DIR).iterdir() if not p.name.startswith(".")]


def test_a_fitted_synthesiser_is_never_stored(tmp_path, glyphs):
    synth = _mepf()
    synth.pretrain(glyphs)
    from dpdistill.privacy import PrivacyLedger

    synth.fit(glyphs, PrivacyLedger(None, 5.0, 1e-5))
    with pytest.raises(ValueError, match="fitted"):
        cache.cached_pretrain(synth, glyphs, False, cache_root=tmp_path)
    assert not (tmp_path / cache.SYNTH_PRETRAIN_DIR).exists()


def test_only_the_mean_embedding_family_opts_in():
    """The cache is declared per class: a method whose pre-training is not a seeded function of its inputs (or
    that keeps state outside generator_state/extra_state) must not opt in by inheritance by accident."""
    from dpdistill.synthesis.registry import get, names

    opted = sorted(n for n in names() if get(n).pretrain_cacheable)
    assert opted == ["dp-mepf", "dp-merf", "dp-ntk"]
