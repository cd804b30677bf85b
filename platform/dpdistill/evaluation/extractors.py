"""Feature extractors for the fidelity metrics: Inception-v3 from a local weights file, or a domain ConvNet.

FID, IS and precision/recall are only comparable between runs that used the SAME extractor, so every extractor
has a ``name`` that goes into every report beside the numbers.

- ``inception-v3`` (the standard). torchvision's Inception-v3 architecture with weights loaded from a local
  file (``weights_path``); nothing is downloaded. Images are resized to 299×299 (bilinear), grey images are
  repeated to three channels, and ImageNet normalisation is applied; features are the 2048-d pool output, the
  IS class probabilities the softmax of its 1000 logits. The name carries the weights file's SHA-256 prefix:
  FIDs with other Inception weights (e.g. pytorch-fid's TF port) are not comparable either.
- ``domain`` (when no Inception weights are available, e.g. offline). DC's ConvNet (width 32, depth 3,
  instance norm) trained for 3 epochs on a PUBLIC set — by default ``glyphs`` (digits rendered from
  matplotlib's fonts, 10,000 images) — at the evaluated image size. Features are its penultimate layer
  (``embed``), IS probabilities its softmax over the public set's classes. It never sees sensitive data.
  Multi-channel images are averaged to grey when the public set is grey. Trained extractors are cached under
  ``$DPDISTILL_CACHE`` (default ``~/.cache/dpdistill``)/extractors/<name>.pt, keyed by everything that
  defines them, so repeated evaluations reuse the same network.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dpdistill.errors import DataError, SpecError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cache_dir() -> Path:
    """Where trained domain extractors are kept: the package's cache root ($DPDISTILL_CACHE or ~/.cache/dpdistill)."""
    from dpdistill.synthesis.cache import default_cache_root  # one definition of the root for every cache

    return default_cache_root()


class Extractor:
    """Maps images [N, C, H, W] in [0, 1] to features [N, F] and class probabilities [N, K]."""

    name: str = ""

    def features_and_probs(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        feats, probs = [], []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                f, p = self._batch(images[start : start + batch_size])
                feats.append(f.double().cpu())
                probs.append(p.double().cpu())
        return torch.cat(feats), torch.cat(probs)

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class InceptionExtractor(Extractor):
    """Inception-v3 (torchvision architecture) with weights from a local file."""

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu") -> None:
        from torchvision.models import inception_v3

        path = Path(weights_path)
        if not path.is_file():
            raise DataError(f"fidelity extractor: Inception-v3 weights file {path} not found")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            net.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise DataError(f"fidelity extractor: {path} is not an Inception-v3 state dict ({err})") from None
        self.fc = net.fc
        net.fc = nn.Identity()
        self.net = net.eval().to(device)
        self.fc = self.fc.eval().to(device)
        self.device = torch.device(device)
        self.name = f"inception-v3:{digest}"

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device)[None, :, None, None]
        std = torch.tensor(IMAGENET_STD, device=self.device)[None, :, None, None]
        feats = self.net((x - mean) / std)
        return feats, F.softmax(self.fc(feats), dim=1)


@dataclass(frozen=True)
class DomainSpec:
    """Everything that defines a domain extractor (and so its cache key and name)."""

    public: str = "glyphs"
    image_size: int = 28
    width: int = 32
    depth: int = 3
    epochs: int = 3
    seed: int = 0

    @property
    def name(self) -> str:
        return (f"convnet-{self.public}-w{self.width}d{self.depth}-{self.image_size}px-e{self.epochs}-s{self.seed}")


class DomainExtractor(Extractor):
    """DC's ConvNet trained on a public set; features = penultimate layer, probabilities = its softmax."""

    def __init__(self, net: nn.Module, spec: DomainSpec, channels: int, mean: float, std: float,
                 device: str | torch.device = "cpu") -> None:
        self.net = net.eval().to(device)
        self.spec = spec
        self.channels = channels
        self.mean, self.std = mean, std
        self.device = torch.device(device)
        self.name = spec.name

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, torch.float32)
        if x.shape[1] != self.channels:
            if self.channels != 1:
                raise DataError(f"fidelity extractor {self.name}: expects {self.channels}-channel images, got "
                                f"{x.shape[1]}")
            x = x.mean(dim=1, keepdim=True)  # grey public set: compare the luminance of colour images
        if x.shape[-1] != self.spec.image_size:
            x = F.interpolate(x, size=(self.spec.image_size,) * 2, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.net.embed(x), F.softmax(self.net(x), dim=1)


def domain_extractor(spec: DomainSpec | None = None, *, cache: bool = True,
                     device: str | torch.device = "cpu") -> DomainExtractor:
    """The domain extractor ``spec`` describes, trained once on its public set and cached on disk."""
    from dpdistill import data, models
    from dpdistill.evaluation.training import train_classifier

    spec = spec or DomainSpec()
    source = data.get(spec.public)
    if source.info.needs_root:
        # Only sets that need no sensitive root qualify as "public" here without further thought.
        raise SpecError(f"fidelity extractor: public set '{spec.public}' must be a built-in public set "
                        "(e.g. glyphs)")
    info = source.info
    path = cache_dir() / "extractors" / f"{spec.name}.pt"

    def build() -> nn.Module:
        return models.get("convnet", channels=info.channels, num_classes=info.num_classes,
                          image_size=spec.image_size, width=spec.width, depth=spec.depth)

    mean, std = float(info.mean[0]), float(info.std[0])
    if cache and path.is_file():
        net = build()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return DomainExtractor(net, spec, info.channels, mean, std, device)
    public = data.load(spec.public, "train", image_size=spec.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = build()
    train_classifier(net, public.images, public.labels, epochs=spec.epochs, batch_size=128, lr=0.01,
                     mean=mean, std=std, generator=torch.Generator().manual_seed(spec.seed))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    return DomainExtractor(net, spec, info.channels, mean, std, device)


def get_extractor(kind: str = "domain", *, image_size: int = 28, inception_weights: str | None = None,
                  public: str = "glyphs", device: str | torch.device = "cpu", **options: Any) -> Extractor:
    """The extractor a spec names: ``"inception-v3"`` (needs ``inception_weights``) or ``"domain"``."""
    if kind == "inception-v3":
        if not inception_weights:
            raise SpecError("fidelity extractor 'inception-v3' needs a local weights file (inception_weights)")
        return InceptionExtractor(inception_weights, device)
    if kind == "domain":
        return domain_extractor(DomainSpec(public=public, image_size=image_size, **options), device=device)
    raise SpecError(f"fidelity extractor '{kind}': expected 'inception-v3' or 'domain'")
