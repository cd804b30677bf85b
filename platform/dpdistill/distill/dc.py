"""DC: dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR'21), with DSA by default. Not private.

Per iteration a fresh ConvNet is drawn; then ``outer_loop`` times: for every class, the gradients of the
network's cross-entropy on a real batch and on that class's synthetic images are matched (layer-wise cosine
distance by default) and the images take one SGD step; between outer steps the network trains for
``inner_loop`` epochs on the synthetic set (DC's Algorithm 1, ``inner_on="synthetic"``; ``inner_on="real"``
takes ``inner_loop`` SGD steps on random real batches instead). With ``dsa_strategy`` set (the default) both
sides of every match share one DSA parameter set, which is the DSA paper's method; ``dsa_strategy: none`` is the original DC.

Matches the reference (VICO-UoE/DatasetCondensation ``main.py``) except the pixel-space set (lr in normalised
units, see :mod:`dpdistill.distill.synthetic`), the optional clamp, and a per-class backward (same gradient,
less memory than summing the classes' graphs first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dpdistill.distill.augment import DSA, DSAParams
from dpdistill.distill.dm import ClassSampler, Matching, MatchingConfig, start_matching
from dpdistill.distill.loop import RunArgs, RunOptions, apply_image_gradient
from dpdistill.distill.losses import DISTANCES, gradient_distance, network_gradients, trainable_parameters
from dpdistill.distill.registry import register
from dpdistill.distill.synthetic import Normalizer, SyntheticSet

if TYPE_CHECKING:
    from typing import Unpack

# DC's (outer_loop, inner_loop) by images per class (the reference's get_loops).
DC_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
BN_BATCH_PER_CLASS = 16  # real images per class that set batch-norm statistics before matching (reference)


def dc_loops(ipc: int) -> tuple[int, int]:
    """DC's (outer_loop, inner_loop) for ``ipc``; an ipc outside the table takes its nearest entry (lower on ties)."""
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    nearest = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[nearest]


class DCConfig(MatchingConfig):
    """DC / DSA options (defaults: the papers' — 1,000 iterations, lr_img 0.1, lr_net 0.01, DSA on)."""

    iterations: int = Field(1000, ge=0, description="outer iterations (a fresh network each)")
    lr_img: float = Field(0.1, gt=0, description="image learning rate, in normalised-image units")
    lr_net: float = Field(0.01, gt=0, description="learning rate of the matching network's inner updates")
    batch_train: int = Field(256, ge=1, description="batch size of the network's inner updates")
    outer_loop: int | None = Field(None, ge=1, description="matching steps per network (None: DC's schedule)")
    inner_loop: int | None = Field(None, ge=0, description="inner epochs between matching steps (None: schedule)")
    distance: Literal["ours", "mse", "cos"] = "ours"
    inner_on: Literal["synthetic", "real"] = "synthetic"

    def loops(self) -> tuple[int, int]:
        """The (outer_loop, inner_loop) in force: explicit values, else DC's schedule for ``ipc``."""
        outer, inner = dc_loops(self.ipc)
        return (self.outer_loop or outer, inner if self.inner_loop is None else self.inner_loop)


def gradient_match_step(
    net: nn.Module,
    syn_images_c: torch.Tensor,
    syn_labels_c: torch.Tensor,
    real_images_c: torch.Tensor,
    real_labels_c: torch.Tensor,
    distance: str = "ours",
    dsa: DSA | None = None,
    params: DSAParams | None = None,
) -> torch.Tensor:
    """DC's matching loss for one class: distance between ``net``'s CE gradients on real vs synthetic images.

    Images are in the network's input space (normalised). With ``dsa``, both sides are augmented with the same
    ``params`` (drawn from the global RNG when None). The result is differentiable w.r.t. ``syn_images_c``;
    the real gradients are detached. The loss also depends on ``net``'s weights: backpropagate with
    ``loss.backward(inputs=[images])`` to leave the network's ``.grad`` untouched.
    """
    if distance not in DISTANCES:
        raise ValueError(f"gradient_match_step: unknown distance {distance!r}")
    if dsa is not None:
        params = params if params is not None else dsa.sample(1)
        real_images_c, syn_images_c = dsa.apply(real_images_c, params), dsa.apply(syn_images_c, params)
    weights = trainable_parameters(net)
    gw_real = network_gradients(net, real_images_c, real_labels_c, params=weights)
    gw_syn = network_gradients(net, syn_images_c, syn_labels_c, create_graph=True, params=weights)
    return gradient_distance(gw_syn, gw_real, distance)


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _freeze_batchnorm(net: nn.Module, sampler: ClassSampler, normalize: Normalizer, num_classes: int,
                      generator: torch.Generator) -> None:
    # As the reference: set BN statistics from a mixed real batch, then keep them fixed while matching.
    x = torch.cat([sampler.batch(c, BN_BATCH_PER_CLASS, generator) for c in range(num_classes)])
    net.train()
    with torch.no_grad():
        net(normalize(x))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _train_inner(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
                 batch_size: int, dsa: DSA | None, generator: torch.Generator) -> None:
    """``epochs`` passes of plain SGD over (x, y) (network-input space), DSA per image as the reference."""
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = x[idx]
            if dsa is not None:
                xb = dsa.apply(xb, dsa.sample(len(xb), generator))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def gradient_matching_iteration(
    m: Matching,
    net: nn.Module,
    opt_img: torch.optim.Optimizer,
    class_loss: Callable[[int], torch.Tensor],
    inner: Callable[[], None],
    before_match: Callable[[], None] | None = None,
) -> float:
    """One network's gradient matching (DC's Algorithm 1, shared by PSG); returns the loss per outer step.

    ``outer_loop`` times (:meth:`DCConfig.loops`): every class's ``class_loss(c)`` (its distance between
    synthetic and real gradients) is backpropagated into the images only, the images take one step, and
    except after the last, ``inner()`` trains ``net`` (when ``inner_loop`` > 0). ``before_match`` runs before
    each outer step (DC: freeze batch-norm statistics).
    """
    outer_loop, inner_loop = m.cfg.loops()
    total = 0.0
    for ol in range(outer_loop):
        if before_match is not None:
            before_match()
        opt_img.zero_grad(set_to_none=True)
        for c in range(m.syn.num_classes):
            loss = class_loss(c)
            # Only the images need this gradient; the network's own updates come later.
            loss.backward(inputs=[m.syn.images])
            total += float(loss.detach())
        apply_image_gradient(opt_img, m.syn, m.normalize, m.cfg.clamp)
        if ol < outer_loop - 1 and inner_loop > 0:
            inner()
    return total / outer_loop


def synthetic_training_set(m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded synthetic set in network-input space, outside the graph (the network must not accumulate
    image gradients from its own training)."""
    with torch.no_grad():
        x, y = m.syn.decoded()
        return m.normalize(x), y


def run_dc(real: Any, cfg: DCConfig | None = None, seed: int | torch.Generator = 0, *,
           init: SyntheticSet | None = None, **options: Unpack[RunOptions]) -> SyntheticSet:
    """Distil ``real`` (an ImageSet) with DC gradient matching (DSA by default); returns the synthetic set.

    Arguments as :func:`~dpdistill.distill.dm.run_dm`; ``callback(iteration, loss)`` gets the iteration's loss
    averaged over its outer steps and summed over classes.
    """
    cfg = cfg if cfg is not None else DCConfig()
    m = start_matching(real, cfg, seed, RunArgs.of(**options), init=init)
    sampler = ClassSampler(real, m.device)
    _, inner_loop = cfg.loops()
    opt_img = m.image_optimizer()

    def step(_: int) -> float:
        net = m.fresh_net(frozen=False)
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)

        def class_loss(c: int) -> torch.Tensor:
            xr = m.normalize(sampler.batch(c, cfg.batch_real, m.g))
            xs = m.normalize(m.syn.class_images(c))
            yr = torch.full((len(xr),), c, dtype=torch.int64, device=m.device)
            ys = torch.full((len(xs),), c, dtype=torch.int64, device=m.device)
            params = m.dsa.sample(1, m.g) if m.dsa is not None else None
            return gradient_match_step(net, xs, ys, xr, yr, cfg.distance, m.dsa, params)

        def inner() -> None:
            if cfg.inner_on == "synthetic":
                x_train, y_train = synthetic_training_set(m)
            else:
                n = min(len(sampler.images), cfg.batch_train * inner_loop)
                pick = torch.randperm(len(sampler.images), generator=m.g)[:n].to(m.device)
                x_train, y_train = m.normalize(sampler.images[pick]), sampler.labels[pick]
            epochs = inner_loop if cfg.inner_on == "synthetic" else 1
            _train_inner(net, opt_net, x_train, y_train, epochs, cfg.batch_train, m.dsa, m.g)

        def freeze() -> None:
            _freeze_batchnorm(net, sampler, m.normalize, m.syn.num_classes, m.g)

        return gradient_matching_iteration(m, net, opt_img, class_loss, inner,
                                           freeze if _has_batchnorm(net) else None)

    return m.loop("DC", step)


register("dc", run_dc, DCConfig, private=False,
         description="gradient matching (Zhao et al., ICLR'21) with DSA (ICML'21), not private")
