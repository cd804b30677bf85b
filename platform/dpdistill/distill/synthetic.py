"""The learnable synthetic (distilled) set, its initialisation, and the pixel <-> network-input mapping.

Space: the set is stored in PIXEL space (the [0, 1] range of :class:`~dpdistill.data.ImageSet`), and matching
code normalises with a per-channel mean/std just before augmentation and the matching network (see
:class:`Normalizer`). So ``export`` is a clamp, not an un-normalisation, and initialising from real or given
images is a copy. The DC/DM papers optimise in normalised space; the distillers keep their learning rates in
those units by preconditioning the pixel gradient with std^2 (:meth:`Normalizer.to_normalised_units`), which
makes SGD on pixels step for step the same as SGD on normalised images. Values may leave [0, 1] during
optimisation unless the distiller clamps after each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dpdistill.distill import multiformation
from dpdistill.errors import DataError, SpecError


class SyntheticSet:
    """A learnable set of ``images`` (an ``nn.Parameter`` [M, C, H, W], pixel space) with fixed ``labels`` [M].

    With ``factor`` f > 1 each stored image decodes into f^2 training images (multi-formation), so the set
    trains on / releases ``M * f^2`` images. Stored images are kept grouped by class (stable order).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int | None = None,
        factor: int = 1,
    ) -> None:
        if images.dim() != 4:
            raise DataError(f"synthetic images: expected [M, C, H, W], got {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise DataError(f"synthetic labels: expected [{len(images)}] class indices, got {tuple(labels.shape)}")
        labels = labels.to(device=images.device, dtype=torch.int64)
        multiformation.check_factor(factor, images.shape[2], images.shape[3])
        order = torch.argsort(labels, stable=True)
        data = images.detach()[order].clone().float()
        self.images = nn.Parameter(data)
        self.labels = labels[order].clone()
        self.num_classes = int(num_classes) if num_classes is not None else int(labels.max()) + 1
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"synthetic labels: expected classes in [0, {self.num_classes - 1}]")
        self.factor = int(factor)
        counts = torch.bincount(self.labels.cpu(), minlength=self.num_classes).tolist()
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        self._slices = [slice(starts[c], starts[c + 1]) for c in range(self.num_classes)]

    # ---------------------------------------------------------------------------------------------- views

    def __len__(self) -> int:
        """Number of images the set trains on / releases (stored images x factor^2)."""
        return len(self.labels) * self.factor**2

    @property
    def ipc(self) -> int:
        """Stored images per class (the smallest class, should they differ)."""
        return min(s.stop - s.start for s in self._slices) if self._slices else 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    def stored_slice(self, c: int) -> slice:
        """The rows of the stored images (and labels) that belong to class ``c``."""
        return self._slices[c]

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All training images [M * f^2, C, H, W] (differentiable w.r.t. ``images``) and their labels."""
        return multiformation.decode(self.images, self.labels, self.factor)

    def class_images(self, c: int) -> torch.Tensor:
        """The decoded images of class ``c`` (differentiable w.r.t. ``images``)."""
        s = self._slices[c]
        images, _ = multiformation.decode(self.images[s], self.labels[s], self.factor)
        return images

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The releasable set: decoded images clamped to [0, 1] (detached, CPU float32) and int64 labels."""
        with torch.no_grad():
            images, labels = self.decoded()
            return images.detach().clamp(0.0, 1.0).float().cpu().contiguous(), labels.detach().cpu().clone()

    def clamp_(self) -> SyntheticSet:
        """Project the stored images onto [0, 1] in place."""
        with torch.no_grad():
            self.images.clamp_(0.0, 1.0)
        return self

    def to(self, device: str | torch.device) -> SyntheticSet:
        """Move the set to ``device`` in place (a new Parameter: rebuild any optimiser afterwards)."""
        self.images = nn.Parameter(self.images.detach().to(device))
        self.labels = self.labels.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (CPU tensors) that :meth:`from_state_dict` restores."""
        return {"images": self.images.detach().cpu().clone(), "labels": self.labels.cpu().clone(),
                "num_classes": self.num_classes, "factor": self.factor}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SyntheticSet:
        """Restore a set saved with :meth:`state_dict`."""
        return cls(state["images"], state["labels"], state["num_classes"], state["factor"])

    # ----------------------------------------------------------------------------------------- initialise

    @classmethod
    def from_real(
        cls,
        real: Any,
        ipc: int,
        generator: torch.Generator | None = None,
        factor: int = 1,
        device: str | torch.device = "cpu",
    ) -> SyntheticSet:
        """Initialise with randomly chosen real images of each class (``ipc * f^2`` per class, packed by f).

        ``real`` is an ImageSet (images in [0, 1], labels, num_classes, per_class_indices()). A class with
        fewer records than needed reuses records (drawn without replacement as far as they go).
        """
        _check_ipc(ipc)
        need = ipc * factor * factor
        chosen, labels = [], []
        for c, idx in enumerate(real.per_class_indices()):
            if len(idx) == 0:
                raise DataError(f"init from real: class {c} of '{getattr(real, 'name', 'dataset')}' has no records")
            reps = -(-need // len(idx))
            order = torch.cat([torch.randperm(len(idx), generator=generator) for _ in range(reps)])[:need]
            chosen.append(idx[order])
            labels.append(torch.full((ipc,), c, dtype=torch.int64))
        images = real.images[torch.cat(chosen)]
        images = multiformation.pack(images.to(device), factor)
        return cls(images, torch.cat(labels), real.num_classes, factor)

    @classmethod
    def from_noise(
        cls,
        num_classes: int,
        ipc: int,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        factor: int = 1,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        device: str | torch.device = "cpu",
    ) -> SyntheticSet:
        """Initialise with noise images of ``shape`` (C, H, W): uniform on [0, 1], or N(mean, std) clipped to [0, 1].

        N(mean, std) in pixel space is DC's ``randn`` initialisation in normalised space.
        """
        _check_ipc(ipc)
        c, h, w = (int(s) for s in shape)
        size = (num_classes * ipc, c, h, w)
        if mean is None or std is None:
            images = torch.rand(size, generator=generator)
        else:
            m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
            s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
            images = (torch.randn(size, generator=generator) * s + m).clamp(0.0, 1.0)
        labels = torch.arange(num_classes).repeat_interleave(ipc)
        return cls(images.to(device), labels, num_classes, factor)

    @classmethod
    def from_images(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        factor: int = 1,
        packed: bool = True,
    ) -> SyntheticSet:
        """Initialise from given pixel-space images: already stored (``packed``) or f^2 per stored image to pack.

        With ``packed=False`` images must come grouped so each run of f^2 images shares one label.
        """
        if not packed and factor > 1:
            per = factor * factor
            groups = labels.reshape(-1, per)
            if not bool((groups == groups[:, :1]).all()):
                raise DataError(f"init from images: each group of factor^2 = {per} images must share one label")
            images, labels = multiformation.pack(images, factor), groups[:, 0]
        return cls(images, labels, num_classes, factor)


def _check_ipc(ipc: int) -> None:
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise SpecError(f"ipc: expected a positive integer (images per class), got {ipc!r}")


class Normalizer:
    """Per-channel ``(x - mean) / std`` from pixel space to network-input space, on one device."""

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                 device: str | torch.device = "cpu") -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        if bool((self.std <= 0).any()):
            raise DataError(f"normalisation std must be positive, got {self.std.flatten().tolist()}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def to_normalised_units(self, pixel_grad: torch.Tensor) -> torch.Tensor:
        """Scale a pixel-space gradient in place so a pixel step of lr * grad equals a normalised-space step.

        With z = (x - m) / s: dL/dx = dL/dz / s, and a step dz = -lr dL/dz is dx = -lr s^2 dL/dx.
        """
        return pixel_grad.mul_(self.std**2)

    @classmethod
    def for_data(cls, real: Any, mean: Sequence[float] | None, std: Sequence[float] | None,
                 device: str | torch.device = "cpu") -> Normalizer:
        """Given statistics, else per-channel statistics of ``real`` itself.

        Computing them from ``real`` reads the training data: fine for the non-private DM/DC, never for a
        private method (pass public statistics there).
        """
        if mean is None or std is None:
            x = real.images
            mean = x.mean(dim=(0, 2, 3)).tolist() if mean is None else mean
            std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist() if std is None else std
        return cls(mean, std, device)


def private_normalizer(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int,
                       device: str | torch.device) -> Normalizer:
    """A normaliser from given (public) statistics, else the data-independent 0.5 / 0.5: never from the data."""
    mean = list(mean) if mean is not None else [0.5] * channels
    std = list(std) if std is not None else [0.5] * channels
    return Normalizer(mean, std, device)
