"""The one source of privacy randomness: every noise draw and every private sampling decision comes from here.

Why a separate source. A DP release is only private if the noise in it is unknown to whoever sees it. If the
noise were drawn from a generator seeded with ``spec.seed`` (written to ``spec.yaml`` and MLflow), anyone holding
the release and its spec could regenerate the noise and subtract it (the attack the privacy-integrity audit
ran). So:

- ``PrivacyRandomness.secret()`` (the default everywhere) seeds every generator it hands out with 63 fresh bits
  from the operating system's entropy (``secrets``/``os.urandom``). The seeds are never stored, logged or
  returned; a new generator gets new entropy, so recovering one generator's state reveals nothing about another.
- ``PrivacyRandomness.reproducible(seed)`` is a DEBUGGING mode: generators derive from ``seed``, so two runs
  give byte-identical "noise". A run in this mode is NOT PRIVATE and every report says so
  (``privacy.reproducible_noise`` in the spec; see :mod:`dpdistill.runner`).

``spec.seed`` keeps driving the data-independent randomness (initialisation, random features, latents,
splits): that randomness is public by design and reproducing it is useful.

Pickling (Ray tasks and actors). A secret source pickles to "secret" and nothing else: the receiving process
draws its own entropy, so a federated client's noise is its own and nothing the server sends determines it. A
reproducible source pickles with its seed and stream label (it is not private anyway).

Limits, stated rather than hidden: torch's CPU generator (MT19937) and CUDA's Philox are not cryptographically
secure PRNGs, and floating-point Gaussian sampling is open to Mironov's (2012) least-significant-bit attack.
Fresh OS entropy per generator bounds what a state-recovery attack on one draw could learn; a CSPRNG-backed
sampler (opacus' ``secure_mode`` with torchcsprng) would close both, and is not available for this torch.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dpdistill.errors import PrivacyError

SECRET = "secret"
REPRODUCIBLE = "reproducible"

NOT_PRIVATE_BANNER = "NOT PRIVATE: privacy.reproducible_noise is on, the noise is derived from spec.seed"


def _derive(seed: int, label: str, counter: int) -> int:
    """A 63-bit seed from (seed, label, counter); only used in the reproducible (debugging) mode."""
    digest = hashlib.blake2b(f"{seed}/{label}/{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PrivacyRandomness:
    """Hands out generators for privacy noise and private sampling; secret unless built as reproducible.

    Use :meth:`secret` for every real release. Everything that touches sensitive data with randomness asks this
    object (``gaussian``, ``poisson_mask``, ``poisson_batches``, ``permutation``, ``generator`` for libraries
    such as opacus that take a ``torch.Generator``), never ``torch.manual_seed`` or a seeded generator.
    """

    def __init__(self, mode: str = SECRET, seed: int | None = None, label: str = "root") -> None:
        if mode not in (SECRET, REPRODUCIBLE):
            raise PrivacyError(f"privacy randomness: unknown mode {mode!r}")
        if mode == REPRODUCIBLE and seed is None:
            raise PrivacyError("privacy randomness: the reproducible (debugging) mode needs a seed")
        self.mode = mode
        self._seed = int(seed) if mode == REPRODUCIBLE else None
        self._label = label
        self._counter = 0

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def secret(cls) -> PrivacyRandomness:
        """The private source: every generator it returns is seeded from the operating system's entropy."""
        return cls(SECRET)

    @classmethod
    def reproducible(cls, seed: int, label: str = "root") -> PrivacyRandomness:
        """DEBUGGING ONLY: noise derived from ``seed``; a release made with it is NOT PRIVATE."""
        return cls(REPRODUCIBLE, seed, label)

    @classmethod
    def for_spec(cls, reproducible_noise: bool, seed: int) -> PrivacyRandomness:
        """The source a job uses: secret, unless the spec turned on the debugging mode."""
        return cls.reproducible(seed) if reproducible_noise else cls.secret()

    @property
    def private(self) -> bool:
        """True when the noise is secret (the only mode in which a release is private)."""
        return self.mode == SECRET

    def spawn(self, label: str) -> PrivacyRandomness:
        """A child source for a sub-component (a client, a stage): secret stays secret, with fresh entropy."""
        if self.private:
            return PrivacyRandomness.secret()
        return PrivacyRandomness.reproducible(_derive(self._seed or 0, f"{self._label}/{label}", 0), label)

    def __reduce__(self) -> tuple[Any, ...]:
        # A secret source carries no state across a pickle: the receiver draws its own entropy.
        if self.private:
            return (PrivacyRandomness.secret, ())
        return (PrivacyRandomness, (REPRODUCIBLE, self._seed, self._label))

    def __repr__(self) -> str:
        return "PrivacyRandomness(secret)" if self.private else "PrivacyRandomness(reproducible: NOT PRIVATE)"

    # -- generators --------------------------------------------------------------------------------------

    def _next_seed(self) -> int:
        if self.private:
            return secrets.randbits(63)
        self._counter += 1
        return _derive(self._seed or 0, self._label, self._counter)

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh ``torch.Generator`` (on ``device``) for privacy randomness, e.g. opacus' noise or sampler."""
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(self._next_seed())
        return g

    def numpy(self) -> np.random.Generator:
        """A fresh numpy generator (PCG64) for privacy randomness."""
        return np.random.default_rng(self._next_seed())

    # -- draws -------------------------------------------------------------------------------------------

    def gaussian(self, shape: tuple[int, ...] | torch.Size, std: float,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, std²) noise for a release; refuses (PrivacyError) rather than ever returning no noise.

        The one guard against a noiseless release: a non-finite or non-positive std, or a draw that came back
        all zeros or non-finite, stops the caller before anything is released.
        """
        if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std <= 0:
            raise PrivacyError(f"noise std must be a finite number > 0 for a private release, got {std!r}")
        device = torch.device(device)
        noise = torch.randn(tuple(shape), generator=self.generator(device), device=device, dtype=dtype) * std
        if not torch.isfinite(noise).all() or (noise.numel() and float(noise.abs().max()) == 0.0):
            raise PrivacyError("noise draw returned no usable noise; refusing to release")
        return noise

    def add_gaussian(self, value: torch.Tensor, std: float) -> torch.Tensor:
        """``value`` plus fresh N(0, std²) noise of its shape, device and dtype."""
        return value + self.gaussian(value.shape, std, value.device, value.dtype)

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        """A Poisson sample of range(n) as a bool mask: each record independently with probability q."""
        if not 0 < q <= 1:
            raise PrivacyError(f"sampling rate q must lie in (0, 1], got {q!r}")
        return torch.rand(int(n), generator=self.generator()) < q

    def poisson_indices(self, n: int, q: float) -> torch.Tensor:
        """The indices of one Poisson sample of range(n) at rate q (the sampling PoissonGaussian accounts)."""
        return self.poisson_mask(n, q).nonzero().flatten()

    def poisson_batches(self, n: int, q: float, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` independent Poisson samples of range(n) at rate q."""
        g = self.generator()
        for _ in range(int(steps)):
            yield (torch.rand(int(n), generator=g) < q).nonzero().flatten()

    def permutation(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of range(n), for private shuffles and assignments."""
        return torch.randperm(int(n), generator=self.generator())

    def integers(self, high: int, size: int = 1) -> torch.Tensor:
        """``size`` uniform integers in [0, high), for private choices (e.g. which discriminator)."""
        return torch.randint(int(high), (int(size),), generator=self.generator())


def resolve(source: PrivacyRandomness | None) -> PrivacyRandomness:
    """``source`` or, when a caller passed none, a fresh secret source (never a seeded one)."""
    if source is None:
        return PrivacyRandomness.secret()
    if not isinstance(source, PrivacyRandomness):
        raise PrivacyError(f"privacy randomness must be a PrivacyRandomness, got {type(source).__name__}")
    return source
