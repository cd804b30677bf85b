"""DP expert guidance (DP-GenG stage f): pull each distilled image towards its class as the expert sees it.

For every distilled (decoded) image of class c, ``refs`` reference images of class c are drawn from the
DP-generated set; the target is the mean of the expert's soft labels on them. The loss per image is
KL(expert output on the image ‖ mean reference soft label) + λ · CE(expert output, c). The expert is a DP
model and the references are DP outputs, so the guidance is post-processing: it costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpdistill.distill import embedding
from dpdistill.distill.synthetic import Normalizer, SyntheticSet


class ExpertGuidance:
    """Expert soft labels of the generated set (computed once) and the guidance loss on a synthetic set."""

    def __init__(self, expert: nn.Module, generated: Any, normalize: Normalizer, refs: int = 10,
                 ce_weight: float = 0.1, temperature: float = 1.0, chunk: int = 1024) -> None:
        self.expert = expert
        self.normalize = normalize
        self.refs = int(refs)
        self.ce_weight = float(ce_weight)
        self.temperature = float(temperature)
        device = normalize.mean.device
        with torch.no_grad():
            probs = [F.softmax(expert(normalize(generated.images[s:s + chunk].to(device))) / self.temperature, dim=1)
                     for s in range(0, len(generated), chunk)]
        self.probs = torch.cat(probs)
        self.class_rows = [idx.to(device) for idx in generated.per_class_indices()]

    def reference_targets(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mean soft label [M, classes] of ``refs`` random generated references of each image's class."""
        out = torch.empty(len(labels), self.probs.shape[1], device=self.probs.device)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().flatten()
            pool = self.class_rows[c]
            pick = torch.randint(len(pool), (len(rows), self.refs), generator=generator).to(pool.device)
            out[rows] = self.probs[pool[pick]].mean(dim=1)
        return out

    def loss(self, syn: SyntheticSet, generator: torch.Generator) -> torch.Tensor:
        """KL(expert(x) ‖ mean reference soft label) + λ·CE(expert(x), label), averaged over the decoded images."""
        x, y = syn.decoded()
        logits = embedding.logits(self.expert, self.normalize(x))
        log_p = F.log_softmax(logits / self.temperature, dim=1)
        target = self.reference_targets(y, generator).clamp_min(1e-8)
        kl = (log_p.exp() * (log_p - target.log())).sum(dim=1).mean()
        return kl + self.ce_weight * F.cross_entropy(logits, y)
