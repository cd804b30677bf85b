"""Caches of non-private pre-training on PUBLIC data: the shared directory machinery, and a synthesiser's own.

Pre-training reads only a public set, so its result may be stored and reused: it costs no privacy and holds no
sensitive record. Two kinds of entry live under the cache root (``$DPDISTILL_CACHE``, else
``~/.cache/dpdistill``, shared with the fidelity extractors' cache):

- ``diffusion-pretrain/`` and ``diffusion-autoencoder/``: the diffusion bases (``synthesis/diffusion``), keyed by
  their own configs and an algorithm version.
- ``synth-pretrain/``: what :meth:`Synthesizer.pretrain` leaves in a synthesiser whose class sets
  ``pretrain_cacheable`` (the mean-embedding family: DP-MERF, DP-NTK, DP-MEPF, whose pre-training on glyphs is a
  deterministic function of the config, the shape, the seed and the public images). :func:`cached_pretrain`
  keys an entry by all of those and by :func:`source_fingerprint`, the hash of this package's source, so ANY code
  change misses the old entries (no version constant to forget to bump). A job pre-trains through it
  (``pretrain(..., cache=True)``): DP-GenG's generate stage and synthesize jobs with ``method.pretrain``, where
  every trial of a sweep, every noise draw of a benchmark and every rerun otherwise repeats the same public
  training (DP-MEPF on the shipped DP-GenG job: its perceptual extractor and 1,000 generator steps). A restored
  entry is bitwise what training leaves at the thread count it was made with; at another thread count, training
  would differ only in floating-point summation order.

Every entry is written under a temporary name and renamed, so a killed run leaves no half-written entry; a lock
file per key makes concurrent callers of one key (Ray tasks, parallel test workers, two jobs) make it once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger(__name__)
SYNTH_PRETRAIN_DIR = "synth-pretrain"
SYNTH_META_FILE = "dpdistill_pretrain.json"
SYNTH_STATE_FILE = "state.pt"


def default_cache_root() -> Path:
    """$DPDISTILL_CACHE, else ~/.cache/dpdistill (shared with the other caches of the package)."""
    return Path(os.environ.get("DPDISTILL_CACHE", Path.home() / ".cache" / "dpdistill"))


def content_hash(data: Any) -> str:
    """SHA-256 of an image set's images (float32, contiguous) and labels (int64)."""
    h = hashlib.sha256()
    h.update(data.images.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.labels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_entry(target: Path, key: str, load: Callable[[Path, str], T | None], make: Callable[[Path], T]) -> T:
    """A cache entry directory made once per key: ``load(target, key)`` when ``target`` holds ``key``; else
    ``make(tmp)`` writes the entry into a temporary directory beside ``target``, which is renamed onto it.

    One process makes a key at a time: others asking for the same key meanwhile (Ray tasks on one node, two jobs
    sharing the cache, parallel test workers) wait for the key's lock file and load the entry instead of making
    it again and replacing the directory under a reader. A killed maker leaves only its temporary directory's
    removal undone, never a half-written entry.
    """
    found = load(target, key)
    if found is not None:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{key[:32]}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = load(target, key)
        if found is not None:
            return found
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:32]}-", dir=target.parent))
        try:
            made = make(tmp)
            if target.exists():  # a stale entry (a key prefix clash or an old version): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return made


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """SHA-256 of every ``.py`` file of the installed dpdistill package (paths and bytes) and torch's version."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def synth_pretrain_key(synth: Any, public: Any) -> tuple[str, dict[str, Any]]:
    """(hex key, the JSON document hashed): everything that determines what ``synth._pretrain(public)`` leaves."""
    import dataclasses

    doc = {"method": synth.name, "config": dataclasses.asdict(synth.config),
           "shape": [synth.channels, synth.image_size, synth.num_classes], "seed": synth.seed,
           "device": torch.device(synth.device).type,
           "public_set": str(getattr(public, "name", "public")), "public_sha256": content_hash(public),
           "source": source_fingerprint()}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest(), doc


def cached_pretrain(synth: Any, public: Any, progress: bool,
                    cache_root: str | os.PathLike[str] | None = None) -> bool:
    """Run ``synth._pretrain(public, progress)``, or restore its result from the cache. True on a cache hit.

    The entry holds :meth:`generator_state` and :meth:`extra_state` right after pre-training: public facts only
    (nothing sensitive has been read yet; a fitted synthesiser is refused, its extra state holds a release).
    """
    if synth.fitted:
        raise ValueError(f"{synth.name}: cached_pretrain on a fitted synthesiser")
    key, doc = synth_pretrain_key(synth, public)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / SYNTH_PRETRAIN_DIR / key[:32]
    try:  # a cache is an optimisation: an unwritable root (a read-only pod home) trains uncached
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK):
            raise PermissionError(f"{target.parent} is not writable")
    except OSError as err:
        log.warning("public pre-training cache unavailable (%s): pre-training without it; set DPDISTILL_CACHE "
                    "to a writable directory", err)
        synth._pretrain(public, progress)
        return False

    def load(path: Path, want: str) -> bool | None:
        meta = path / SYNTH_META_FILE
        if not meta.is_file() or json.loads(meta.read_text()).get("key") != want:
            return None
        state = torch.load(path / SYNTH_STATE_FILE, map_location="cpu", weights_only=True)
        synth.load_extra_state(state["extra"])
        synth.load_generator_state(state["generator"])
        return True

    def make(tmp: Path) -> bool:
        synth._pretrain(public, progress)
        torch.save({"generator": synth.generator_state(), "extra": synth.extra_state()}, tmp / SYNTH_STATE_FILE)
        (tmp / SYNTH_META_FILE).write_text(json.dumps({"key": key, "inputs": doc}, indent=1))
        return False

    return cached_entry(target, key, load, make)
