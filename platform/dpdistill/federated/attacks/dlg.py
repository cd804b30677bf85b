"""Gradient inversion by an honest-but-curious SFDD server: DLG (Zhu et al., 2019) and iDLG (Zhao et al., 2020).

Attacker-friendly setting, as in the SFDD paper: the victim network is a sigmoid network without pooling
(DLG's LeNet, or a sigmoid ConvNet with pooling and norm off) whose initial parameters the server knows, and
the server observes the gradient a client computes on a small real batch with that network — the term of the
client's matching loss through which its real data reaches the returned update. Observing it exactly is at
least as strong as observing the update, so the MSE here is a lower bound on what defences achieve.

DLG optimises a dummy image and a dummy soft label with LBFGS until their gradient matches the observed one;
iDLG first reads the label off the sign of the last layer's gradient (exact for one record and one-hot labels)
and optimises the image only. LDPO-RLD defeats both by computing the gradient against a soft label the server
cannot guess. MSE is measured in the network's input space (normalised images), as the DLG papers do, after
projecting the reconstruction onto the valid pixel range.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dpdistill.distill.losses import network_gradients
from dpdistill.distill.synthetic import Normalizer
from dpdistill.privacy.noise import PrivacyRandomness, resolve

LabelFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
ProtectFn = Callable[[torch.Tensor, PrivacyRandomness], torch.Tensor]


@dataclass
class AttackResult:
    """Outcome of attacking several records, one at a time: mean MSE and how often the label was recovered."""

    method: str
    mse: float
    label_accuracy: float
    per_record: list[float] = field(default_factory=list)
    seconds: float = 0.0


def attack_net(model: str, channels: int, num_classes: int, image_size: int, seed: int) -> nn.Module:
    """The victim network, its weights drawn from ``seed`` (known to the server): sigmoid, no pooling."""
    from dpdistill import models

    kwargs = {"act": "sigmoid"} if model == "lenet" else {"act": "sigmoid", "pool": "none", "norm": "none",
                                                          "width": 32, "depth": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.get(model, channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)


def observed_gradient(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """The gradient the server sees: CE of ``net`` on (x, target); target is class indices or soft labels."""
    return network_gradients(net, x, target)


def idlg_label(grads: Sequence[torch.Tensor]) -> int:
    """iDLG's label: the last linear layer's row whose gradient sums most negative (p_c - y_c < 0 for the true c).

    With non-negative features (sigmoid outputs) row i of the weight gradient is (p_i - y_i) h, so only the true
    class's row is negative for a one-hot label of a single record.
    """
    weight = [g for g in grads if g.dim() == 2][-1]
    return int(weight.sum(dim=1).argmin())


def dlg(
    net: nn.Module,
    target_grads: Sequence[torch.Tensor],
    shape: Sequence[int],
    num_classes: int,
    *,
    labels: torch.Tensor | None = None,
    iterations: int = 300,
    lr: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct a batch of ``shape`` from its gradient by LBFGS; returns (images, soft labels).

    With ``labels`` (class indices, iDLG) only the images are optimised; without, a dummy soft label is learnt
    too (DLG). The iterate with the lowest gradient distance is returned, so a divergence late in the run (DLG's
    known failure mode) does not throw away an earlier good reconstruction.
    """
    x = torch.randn(tuple(shape), generator=generator).requires_grad_(True)
    if labels is None:
        y_logits = torch.randn(shape[0], num_classes, generator=generator).requires_grad_(True)
        variables = [x, y_logits]
    else:
        y_fixed = F.one_hot(labels.long(), num_classes).float()
        variables = [x]
    opt = torch.optim.LBFGS(variables, lr=lr)
    targets = [g.detach() for g in target_grads]

    def soft() -> torch.Tensor:
        return F.softmax(y_logits, dim=-1) if labels is None else y_fixed

    def closure() -> torch.Tensor:
        opt.zero_grad()
        dummy = network_gradients(net, x, soft(), create_graph=True)
        loss = sum(((d - t) ** 2).sum() for d, t in zip(dummy, targets, strict=True))
        loss.backward()
        return loss

    best = (math.inf, x.detach().clone(), soft().detach().clone())
    for _ in range(iterations):
        # LBFGS reports the loss at the iterate it started from: keep that iterate, not the one it moves to.
        before = (x.detach().clone(), soft().detach().clone())
        loss = float(opt.step(closure).detach())
        if not math.isfinite(loss) or not bool(torch.isfinite(x).all()):
            break
        if loss < best[0]:
            best = (loss, *before)
        if loss < 1e-12:
            break
    return best[1], best[2]


def reconstruction_mse(recon: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean squared error per pixel; for several records, under the best matching of reconstructions to truths."""
    if len(truth) == 1:
        return float(((recon - truth) ** 2).mean())
    from scipy.optimize import linear_sum_assignment

    cost = ((recon[:, None] - truth[None]) ** 2).flatten(2).mean(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].mean())


def attack_records(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    method: str = "dlg",
    model: str = "lenet",
    iterations: int = 300,
    label_fn: LabelFn | None = None,
    protect: ProtectFn | None = None,
    seed: int = 0,
    client_noise: PrivacyRandomness | None = None,
) -> AttackResult:
    """Attack each record (pixel-space ``images`` [N, C, H, W]) from the gradient its client would compute.

    ``label_fn(labels, g)`` gives the labels the client computes gradients with (LDPO-RLD soft labels; default
    the true class); ``protect(flat_gradient, noise)`` models a protection of the observed gradient (e.g.
    LocalDP's clip and noise). The simulated client's randomness (``g`` of ``label_fn``, ``noise`` of
    ``protect``) comes from ``client_noise`` (None: a fresh secret source), apart from the attacker's ``seed``:
    as in a real federation the server does not know it. Reconstructions stay in memory: they are the sensitive
    records when the attack works.
    """
    if method not in ("dlg", "idlg"):
        raise ValueError(f"attack_records: method must be dlg or idlg, got {method!r}")
    started = time.perf_counter()
    normalize = Normalizer(mean, std)
    lo = normalize(torch.zeros(1, *images.shape[1:]))
    hi = normalize(torch.ones(1, *images.shape[1:]))
    g = torch.Generator().manual_seed(seed)
    client_noise = resolve(client_noise)
    client_g = client_noise.generator()
    per_record: list[float] = []
    correct = 0
    for i in range(len(images)):
        net = attack_net(model, images.shape[1], num_classes, images.shape[-1], seed + i)
        x = normalize(images[i : i + 1])
        y = labels[i : i + 1]
        target = label_fn(y, client_g) if label_fn is not None else y
        grads = observed_gradient(net, x, target)
        if protect is not None:
            flat = torch.cat([t.reshape(-1) for t in grads])
            flat = protect(flat, client_noise)
            grads = [t.reshape(s.shape) for t, s in zip(flat.split([s.numel() for s in grads]), grads, strict=True)]
        known = torch.tensor([idlg_label(grads)]) if method == "idlg" else None
        recon, soft = dlg(net, grads, x.shape, num_classes, labels=known, iterations=iterations, generator=g)
        # The attacker knows pixels lie in [0, 1]: projecting onto that range keeps a diverged run's MSE finite
        # and comparable (the worst case is the range's width squared, not an arbitrary large number).
        recon = torch.maximum(torch.minimum(recon, hi), lo)
        per_record.append(reconstruction_mse(recon, x))
        correct += int(int(soft.argmax(dim=-1)[0]) == int(y[0]))
    return AttackResult(method, float(sum(per_record) / len(per_record)), correct / len(images), per_record,
                        time.perf_counter() - started)
