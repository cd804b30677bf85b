"""Caches of non-private pre-training on PUBLIC data: the shared directory machinery, and a synthesiser's own.

Pre-training reads only a public set, so its result may be stored and reused: it costs no privacy and holds no
sensitive record. Two kinds of entry live under the cache root (``$DPDISTILL_CACHE``, else
``~/.cache/dpdistill``, shared with the fidelity extractors' cache):

- ``diffusion-pretrain/`` and ``diffusion-autoencoder/``: the diffusion bases (``synthesis/diffusion``), keyed by
  their own configs and an algorithm version.
- ``synth-pretrain/``: what :meth:`Synthesizer.pretrain` leaves in a synthesiser whose class sets
  ``pretrain_cacheable`` (the mean-embedding family: DP-MERF, DP-NTK, DP-MEPF, whose pre-training on glyphs is a
  deterministic function of the config, the shape, the seed, the starting weights and the public images).
  :func:`cached_pretrain` keys an entry by all of those and by :func:`source_fingerprint`, the hash of this
  package's source, so ANY code change misses the old entries (no version constant to forget to bump). A job
  pre-trains through it (``pretrain(..., cache=True)``): DP-GenG's generate stage and synthesize jobs with
  ``method.pretrain``, where every trial of a sweep, every noise draw of a benchmark and every rerun otherwise
  repeats the same public training (DP-MEPF on the shipped DP-GenG job: its perceptual extractor and 1,000
  generator steps). On CPU a restored entry is bitwise what training leaves at the thread count it was made
  with; at another thread count (or on a GPU, whose kernels need not be deterministic) training would differ
  only in floating-point order.

Every entry is written under a temporary name and renamed, so a killed run leaves no half-written entry; a lock
file per key makes concurrent callers of one key (Ray tasks, parallel test workers, two jobs) make it once.
"""

from __future__ import annotations

import dataclasses
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


def source_fingerprint(root: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of every ``.py`` file under ``root`` (default: the installed dpdistill package; paths and bytes)
    and torch's version. The package's is computed once per process."""
    if root is None:
        return _package_fingerprint()
    root = Path(root)
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _package_fingerprint() -> str:
    return source_fingerprint(Path(__file__).resolve().parents[1])


def _hash_state(h: Any, value: Any) -> None:
    """Feed a nested state (dicts, lists, tensors, scalars, None) into ``h``, canonically."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"D")
        for k in sorted(value, key=str):
            h.update(str(k).encode() + b"=")
            _hash_state(h, value[k])
    elif isinstance(value, list | tuple):
        h.update(b"L")
        for v in value:
            _hash_state(h, v)
    else:
        h.update(repr(value).encode())
    h.update(b";")


def starting_state_hash(synth: Any) -> str:
    """SHA-256 of the generator tensors and extra state a pre-training would start from: a synthesiser pre-trained
    once already (or given other weights) keys another entry than a fresh one."""
    h = hashlib.sha256()
    _hash_state(h, {"generator": synth.generator_state(), "extra": synth.extra_state()})
    return h.hexdigest()


def synth_pretrain_key(synth: Any, public: Any) -> tuple[str, dict[str, Any]]:
    """(hex key, the JSON document hashed): everything that determines what ``synth._pretrain(public)`` leaves."""
    doc = {"method": synth.name, "config": dataclasses.asdict(synth.config),
           "shape": [synth.channels, synth.image_size, synth.num_classes], "seed": synth.seed,
           "device": torch.device(synth.device).type, "start": starting_state_hash(synth),
           "public_set": str(getattr(public, "name", "public")), "public_sha256": content_hash(public),
           "source": source_fingerprint()}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest(), doc


def cached_pretrain(synth: Any, public: Any, progress: bool,
                    cache_root: str | os.PathLike[str] | None = None) -> bool:
    """Run ``synth._pretrain(public, progress)``, or restore its result from the cache. True on a cache hit.

    The entry holds :meth:`generator_state` and :meth:`extra_state` right after pre-training: public facts only
    (nothing sensitive has been read yet; a fitted synthesiser is refused, its extra state holds a release). The
    cache is an optimisation: an entry that cannot be read counts as a miss, and a root that cannot be written
    (a read-only pod home, a full disk) pre-trains without it, with a warning.
    """
    if synth.fitted:
        raise ValueError(f"{synth.name}: cached_pretrain on a fitted synthesiser")
    key, doc = synth_pretrain_key(synth, public)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / SYNTH_PRETRAIN_DIR / key[:32]
    trained = False

    def load(path: Path, want: str) -> bool | None:
        try:
            if json.loads((path / SYNTH_META_FILE).read_text()).get("key") != want:
                return None
            state = torch.load(path / SYNTH_STATE_FILE, map_location="cpu", weights_only=True)
            generator, extra = state["generator"], state["extra"]
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - a damaged entry is a miss, never a failed job
            log.warning("public pre-training cache entry %s unreadable (%s): pre-training again", path, err)
            return None
        synth.load_extra_state(extra)
        synth.load_generator_state(generator)
        synth.generator_net.eval()  # as training leaves it
        return True

    def make(tmp: Path) -> bool:
        nonlocal trained
        synth._pretrain(public, progress)
        trained = True
        torch.save({"generator": synth.generator_state(), "extra": synth.extra_state()}, tmp / SYNTH_STATE_FILE)
        (tmp / SYNTH_META_FILE).write_text(json.dumps({"key": key, "inputs": doc}, indent=1))
        return False

    try:
        return cached_entry(target, key, load, make)
    except (OSError, RuntimeError) as err:  # torch.save on a full disk raises RuntimeError
        if not trained and not isinstance(err, OSError):
            raise  # pre-training itself failed: not a cache problem
        log.warning("public pre-training cache unavailable (%s)%s; set DPDISTILL_CACHE to a writable directory",
                    err, "" if trained else ": pre-training without it")
        if not trained:
            synth._pretrain(public, progress)
        return False
