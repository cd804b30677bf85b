"""Matching losses for dataset distillation: DM's feature-mean distance and DC's layer-wise gradient distances."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpdistill.errors import SpecError

DISTANCES: tuple[str, ...] = ("ours", "mse", "cos")
_EPS = 1e-6  # the reference's guard against zero-norm gradients


def feature_mean_distance(real_features: torch.Tensor, syn_features: torch.Tensor) -> torch.Tensor:
    """DM's loss for one class: ``||mean f(real) - mean f(syn)||^2`` over feature vectors [N, D]."""
    return ((real_features.mean(dim=0) - syn_features.mean(dim=0)) ** 2).sum()


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """DC's per-layer distance: sum over output nodes of (1 - cosine) between real and synthetic gradients.

    A conv weight [out, in, kh, kw] and a linear weight [out, in] are compared row by row (one row per output
    node). One-dimensional tensors (biases, norm affine parameters) contribute 0, as in the reference.
    """
    if g_real.dim() == 1:
        return g_real.new_zeros(())
    gr = g_real.reshape(g_real.shape[0], -1)
    gs = g_syn.reshape(g_syn.shape[0], -1)
    cos = (gr * gs).sum(dim=-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + _EPS)
    return (1 - cos).sum()


def gradient_distance(
    gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor], metric: str = "ours"
) -> torch.Tensor:
    """Distance between two lists of per-parameter gradients: ``ours`` (DC, layer-wise), ``mse`` or ``cos``.

    ``mse`` is the summed squared difference of the flattened gradients and ``cos`` is 1 - cosine similarity
    of the flattened gradients, as in the DC reference's ``match_loss``.
    """
    if len(gw_syn) != len(gw_real):
        raise ValueError(f"gradient_distance: {len(gw_syn)} synthetic vs {len(gw_real)} real gradient tensors")
    if metric == "ours":
        return torch.stack([layer_distance(r, s) for r, s in zip(gw_real, gw_syn, strict=True)]).sum()
    real = torch.cat([g.reshape(-1) for g in gw_real])
    syn = torch.cat([g.reshape(-1) for g in gw_syn])
    if metric == "mse":
        return ((syn - real) ** 2).sum()
    if metric == "cos":
        return 1 - (real * syn).sum() / (real.norm() * syn.norm() + _EPS)
    raise SpecError(f"distance: expected one of {', '.join(DISTANCES)}, got {metric!r}")


def trainable_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters gradients are matched over (those with requires_grad), in module order."""
    return [p for p in net.parameters() if p.requires_grad]


def network_gradients(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    create_graph: bool = False,
    params: Iterable[nn.Parameter] | None = None,
) -> list[torch.Tensor]:
    """Gradients of ``net``'s cross-entropy on (x, y) w.r.t. its parameters, one tensor per parameter.

    With ``create_graph=True`` (the synthetic side) the gradients stay differentiable w.r.t. ``x``; without it
    (the real side) they are detached copies.
    """
    params = list(params) if params is not None else trainable_parameters(net)
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return list(grads) if create_graph else [g.detach() for g in grads]
