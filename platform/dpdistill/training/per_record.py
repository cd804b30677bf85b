"""Per-record clipped-gradient sums for DP-SGD: three interchangeable backends, one contract, chosen per model.

Every backend computes, for one chunk of records, Σ_i clip_C(g_i) with g_i = (1/K) Σ_k ∇θ loss_ik (record i's K
rows averaged BEFORE clipping, the whole vector over all trainable parameters clipped as one), and nothing else:
no noise, no sampling (the engine, :mod:`dpdistill.training.dp_sgd`, does those). They differ in how they get
the per-record norms:

- ``hooks``: opacus' ``GradSampleModule`` materialises every record's gradient (``p.grad_sample``), then
  :func:`~dpdistill.privacy.dp_ops.clipped_per_example_sum`. Any layer opacus knows (and its torch.func
  fallback for others).
- ``ghost`` (fast gradient clipping with book-keeping; Li et al. 2022, Bu et al. 2023): the forward records each
  trainable layer's input and output; ONE backward computes only the gradients w.r.t. those outputs (no
  parameter gradient); per-record squared norms follow per layer: for Linear / Conv2d either the Gram trick
  ||Σ_p g_p a_pᵀ||² = Σ_{p,p'} (a_p·a_p')(g_p·g_p') (no per-record gradient at all) or the record's weight
  gradient built on the spot (stride-1 convs from strided views of the padded input, no unfold copy), whichever
  costs fewer multiply-adds for that layer's shape; exact per-row gradients for GroupNorm / LayerNorm (small);
  the Gram trick with an index-equality mask for Embedding (the padding row masked). A record's K rows (and a
  layer called several times) are extra positions p of the record, so the norm is that of the MEAN of the K
  rows' gradients, exactly as ``hooks``. The clipped sum Σ_i min(1, C/‖g_i‖)·g_i is then assembled per layer
  from what the norms kept (the per-record gradients, or one contraction Σ_{n,p} c_n g_np a_npᵀ): no second
  backward pass. Supported: exactly nn.Linear, nn.Conv2d (zero padding, groups 1), nn.GroupNorm (and the
  project's InstanceNorm, the same function), nn.LayerNorm, nn.Embedding (no max_norm, no scale_grad_by_freq,
  no sparse); a model whose trainable parameters sit in anything else (or one parameter in two modules) is not
  ghost-clippable: :func:`ghost_support` says why, ``ghost`` refuses it and ``auto`` falls back to ``hooks``. A layer input or
  output changed in place after the layer ran is refused (PrivacyError), never mis-clipped.
- ``functorch``: ``torch.func.vmap(grad(...))`` over records, each record's K rows one vmapped call. Needs the
  objective's randomness drawn OUTSIDE the vmapped function: the objective must offer ``draw_rows(images,
  labels, multiplicity, generator)`` (every random draw, returning per-row tensors with B·K rows) and
  ``row_losses(net, *rows)`` (deterministic, one loss per row), with ``losses`` = ``row_losses(net,
  *draw_rows(...))``. vmap's randomness="error" refuses an objective that still draws inside.

``auto`` (the default of :class:`~dpdistill.training.dp_sgd.DPSGDSchedule`) is a function of the model's
architecture only (public: never of the data): ``ghost`` when :func:`ghost_support` accepts the model, else
``hooks``. Why: benchmarks/bench_dp_step.py (results/dp_step.md; 2 threads on this project's 2-core machine,
denormals flushed, one physical batch), CPU-time ratio of a DP-SGD step to the non-private step of the same
model and batch, at a quiet moment: the DP-GenG expert ConvNet (width 32, instance norm, batch 512) hooks 1.99×,
ghost 1.79×, torch.func 1.74× (wall 2.01 / 1.82 / 1.91×); the pdp-diffusion MNIST UNet (batch 256, K = 1) hooks
2.47×, ghost 1.70×, torch.func 2.88×; the same UNet with DPDM's K = 4 (1,024 rows, results/
dp_step_unet_k4.md) hooks 3.86×, ghost 3.41×, torch.func 9.3×. Ghost was the fastest or within noise of it
everywhere (earlier runs under load: the ConvNet's three within ±0.3× of each other, ghost at or below hooks
in three of four), and far ahead where opacus' per-sample conv rule unfolds large inputs (the UNet).
``functorch`` is never chosen by auto: not faster where ghost applies, and it materialises every record's full
gradient (memory B × parameters).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpdistill.errors import PrivacyError, SpecError
from dpdistill.models.instance_norm import InstanceNorm, normalise
from dpdistill.privacy.dp_ops import clip_factors, clipped_per_example_sum

GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "functorch")
BACKENDS = ("hooks", "ghost", "functorch")

# InstanceNorm is a GroupNorm computing the same function with a faster CPU path: same per-record gradients.
_GHOST_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, InstanceNorm, nn.LayerNorm, nn.Embedding)


# --------------------------------------------------------------------------------------------- support / choice


def _owners(net: nn.Module, params: Sequence[nn.Parameter]) -> tuple[list[nn.Module], str | None]:
    """The modules that directly own a trainable parameter; a reason string when a parameter is shared."""
    wanted = {id(p) for p in params}
    owners: list[nn.Module] = []
    seen: dict[int, str] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        own = [(n, p) for n, p in module._parameters.items() if p is not None and id(p) in wanted]
        if not own:
            continue
        for n, p in own:
            if id(p) in seen and seen[id(p)] != f"{name}.{n}":
                return owners, f"parameter {seen[id(p)]} is also {name}.{n} (tied weights)"
            seen[id(p)] = f"{name}.{n}"
        if module not in owners:
            owners.append(module)
    missing = wanted - set(seen)
    if missing:
        return owners, f"{len(missing)} trainable parameter(s) are not owned by any submodule of the network"
    return owners, None


def ghost_support(net: nn.Module, params: Sequence[nn.Parameter]) -> str | None:
    """None when ghost clipping computes exact per-record norms for ``net``'s ``params``; else why not."""
    owners, problem = _owners(net, params)
    if problem:
        return problem
    for module in owners:
        kind = type(module)
        if kind not in _GHOST_TYPES:  # exact types: a subclass may change forward (LoRA-compatible layers ...)
            return f"{kind.__name__} holds trainable parameters (ghost clipping knows {_type_names()})"
        if kind is nn.Conv2d and (module.groups != 1 or module.padding_mode != "zeros"
                                  or isinstance(module.padding, str)):
            return "a Conv2d with groups != 1, a non-zero padding mode or string padding"
        if kind is nn.Embedding and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            return "an Embedding with max_norm, scale_grad_by_freq or sparse gradients"
        if kind in (nn.GroupNorm, InstanceNorm, nn.LayerNorm) and not _affine(module):
            return f"a {kind.__name__} without affine parameters but with trainable ones"
    return None


def _affine(module: nn.Module) -> bool:
    return bool(getattr(module, "affine", False) or getattr(module, "elementwise_affine", False))


def _type_names() -> str:
    return ", ".join(t.__name__ for t in _GHOST_TYPES)


def functorch_support(objective: Any) -> str | None:
    """None when ``objective`` draws its randomness outside the loss (``draw_rows`` / ``row_losses``)."""
    if callable(getattr(objective, "draw_rows", None)) and callable(getattr(objective, "row_losses", None)):
        return None
    return (f"{type(objective).__name__} has no draw_rows/row_losses (its randomness cannot be drawn outside "
            "the vmapped loss)")


def choose_backend(mode: str, objective: Any, net: nn.Module, params: Sequence[nn.Parameter]) -> str:
    """The backend ``mode`` means for this model (public: architecture only); SpecError when it cannot serve it.

    ``auto``: ``ghost`` when the model is ghost-clippable, else ``hooks`` (the module docstring says why).
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise SpecError(f"dp-sgd: grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "ghost" if ghost_support(net, params) is None else "hooks"
    if mode == "ghost":
        reason = ghost_support(net, params)
        if reason:
            raise SpecError(f"dp-sgd: grad_sample_mode ghost cannot clip this model exactly: {reason}; use hooks "
                            "or auto")
    if mode == "functorch":
        reason = functorch_support(objective)
        if reason:
            raise SpecError(f"dp-sgd: grad_sample_mode functorch: {reason}; use hooks, ghost or auto")
    return mode


def open_backend(name: str, net: nn.Module, params: Sequence[nn.Parameter]) -> Any:
    """The backend ``name`` attached to ``net`` (call ``.close()`` when done)."""
    if name == "hooks":
        return HooksBackend(net, params)
    if name == "ghost":
        return GhostBackend(net, params)
    if name == "functorch":
        return FunctorchBackend(net, params)
    raise SpecError(f"dp-sgd: unknown per-record backend {name!r}")


def _no_inplace(net: nn.Module) -> None:
    # Hooks on a layer's output (opacus' and ghost's) need that output left as it is: in-place activations off
    # (same values, one more tensor).
    for module in net.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False


def _check_rows(rows: Tensor, b: int, k: int) -> None:
    if rows.ndim != 1 or rows.shape[0] != b * k:
        raise PrivacyError(f"dp-sgd: the objective returned losses of shape {tuple(rows.shape)} for {b} "
                           f"records x multiplicity {k}; expected [{b * k}] (one per row)")


# --------------------------------------------------------------------------------------------------- hooks


def _per_record(gs: Tensor | list[Tensor] | None, param: Tensor, records: int, k: int) -> Tensor:
    """One parameter's per-record gradient [records, *shape]: the mean of the record's K rows."""
    if gs is None:  # the parameter took no part in the forward: its gradient is zero for every record
        return torch.zeros((records, *param.shape), device=param.device, dtype=param.dtype)
    if isinstance(gs, list):  # several backward passes accumulated (not done here, but opacus allows it)
        gs = torch.stack(gs).sum(0)
    if gs.shape[0] == records * k:
        return gs.reshape(records, k, *param.shape).mean(1)
    if gs.shape[0] == records:  # the network saw each record once and the K losses share that forward
        return gs / k
    raise PrivacyError(f"dp-sgd: per-sample gradients of {gs.shape[0]} rows for {records} records x "
                       f"multiplicity {k}; an objective's network must take the records (or their K rows) "
                       "along dimension 0")


class HooksBackend:
    """Opacus' per-sample gradients (``GradSampleModule`` hooks, loss reduction "sum"), then clip and sum."""

    name = "hooks"

    def __init__(self, net: nn.Module, params: Sequence[nn.Parameter]) -> None:
        from opacus import GradSampleModule

        _no_inplace(net)
        # opacus looks grad samplers up by exact type; InstanceNorm's per-sample gradients are GroupNorm's.
        GradSampleModule.GRAD_SAMPLERS.setdefault(InstanceNorm, GradSampleModule.GRAD_SAMPLERS[nn.GroupNorm])
        self.sampler = GradSampleModule(net, batch_first=True, loss_reduction="sum", strict=True)

    def clipped_sum(self, objective: Any, net: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor,
                    k: int, clip: float, generator: torch.Generator) -> list[Tensor]:
        return hooks_clipped_sum(objective, net, params, x, y, k, clip, generator)

    def close(self) -> None:
        self.sampler.remove_hooks()


def hooks_clipped_sum(objective: Any, net: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor, k: int,
                      clip: float, generator: torch.Generator) -> list[Tensor]:
    """One chunk through opacus' hooks (``net`` must carry them)."""
    b = len(x)
    for p in params:
        p.grad_sample = None
        p.grad = None
    rows = objective.losses(net, x, y, k, generator)
    _check_rows(rows, b, k)
    with warnings.catch_warnings():
        # The images never require grad, so torch notes that the first layer's full backward hook fires
        # for its output only: exactly what opacus needs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        rows.sum().backward()
    per_record = [_per_record(getattr(p, "grad_sample", None), p, b, k) for p in params]
    for p in params:
        p.grad_sample = None
        p.grad = None
    return clipped_per_example_sum(per_record, clip)


# --------------------------------------------------------------------------------------------------- ghost


def _per_row_to_record(t: Tensor, b: int, k: int, what: str) -> Tensor:
    """Per-row tensors [n, ...] summed over each record's rows: [b, ...] (n = b·K, or b when the network saw
    each record once and the K losses share that forward)."""
    n = t.shape[0]
    if n == b * k:
        return t.reshape(b, k, *t.shape[1:]).sum(1) if k > 1 else t
    if n == b:
        return t
    raise PrivacyError(f"dp-sgd ghost: a {what} saw {n} rows for {b} records x multiplicity {k}; an objective's "
                       "network must take the records (or their K rows) along dimension 0")


def _record_positions(t: Tensor, b: int, k: int, what: str) -> Tensor:
    """A call's [n, d, P] as the records' [b, d, P'] (a record's K rows are more positions of it)."""
    n, d, positions = t.shape
    if n == b * k and k > 1:
        return t.reshape(b, k, d, positions).permute(0, 2, 1, 3).reshape(b, d, k * positions)
    _per_row_to_record(t[:, :1, :1], b, k, what)  # the row-count check only
    return t


Finish = Callable[[Tensor], dict[str, Tensor]]


def _unfold(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``F.unfold(x, ...)`` for ``conv``'s geometry, [n, C_in·kh·kw, L], by zero padding and one strided copy.

    Same values as F.unfold (tests/test_dp_sgd_backends.py checks it); on CPU torch's im2col was the bulk of
    ghost's time on the UNet (about 5× slower than this copy, measured with torch 2.14 on this machine).
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    x = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).contiguous()
    n, c, height, width = x.shape
    oh = (height - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((n, c, kh, kw, oh, ow), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
    return view.reshape(n, c * kh * kw, oh * ow)


def _row_coefficients(coef: Tensor, n: int, b: int, k: int) -> Tensor:
    """Per-record coefficients [b] as per-row ones [n] (a record's K rows share the record's)."""
    return coef.repeat_interleave(k) if n == b * k and k > 1 else coef


def _conv_per_row(x: Tensor, g: Tensor, conv: nn.Conv2d) -> Tensor:
    """Each row's weight gradient [n, C_out, C_in·kh·kw] of a stride-1 ``conv`` without unfolding its input.

    For one kernel offset (i, j) the inputs the output positions read are, in the zero-padded input flattened
    over (H, W), one contiguous run of oh·W values per channel: a strided VIEW [n, C_in, oh·W] (W the padded
    width; its W − ow extra columns per row meet zero columns appended to g). So each offset is one batched
    matmul of g [n, C_out, oh·W] with that view: the per-row gradient without the kh·kw-times larger copy
    an unfold makes. One extra zero row at the bottom keeps the last offset's run inside the tensor.
    """
    (kh, kw), (dh, dw), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
    x = F.pad(x, (pw, pw, ph, ph + 1)).contiguous()
    n, c, height, width = x.shape
    oh, ow = g.shape[2], g.shape[3]
    gp = F.pad(g, (0, width - ow)).reshape(n, g.shape[1], oh * width)
    base = x.storage_offset()
    parts = []
    for i in range(kh):
        for j in range(kw):
            view = x.as_strided((n, c, oh * width), (c * height * width, height * width, 1),
                                base + i * dh * width + j * dw)
            parts.append(torch.bmm(gp, view.transpose(1, 2)))  # [n, C_out, C_in]
    return torch.stack(parts, -1).reshape(n, g.shape[1], c * kh * kw)  # (C_in, kh, kw): the weight's order


class _Call:
    """One call of a Linear / Conv2d: its output gradients [n, d_out, P], its activations [n, d_in, P] and each
    row's weight gradient [n, d_out, d_in], the last two computed only when asked."""

    def __init__(self, module: nn.Module, a: Tensor, g: Tensor) -> None:
        self.module, self.a = module, a
        if isinstance(module, nn.Conv2d):
            self.g = g.flatten(2)  # [n, C_out, L]: a view
            self.g4 = g
        else:  # [n, ..., d] -> [n, d, T]
            self.g = g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)
        self._acts: Tensor | None = None

    def acts(self) -> Tensor:
        if self._acts is None:
            m, a = self.module, self.a
            self._acts = _unfold(a, m) if isinstance(m, nn.Conv2d) \
                else a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
        return self._acts

    def per_row(self) -> Tensor:
        m = self.module
        # The strided views pay off where the unfold copy is large (many input channels); a first layer on grey
        # images (C_in = 1) is one matmul of its small unfold instead of kh·kw matmuls with one output column.
        if isinstance(m, nn.Conv2d) and m.stride == (1, 1) and m.in_channels >= 8:
            return _conv_per_row(self.a, self.g4, m)
        return torch.bmm(self.g, self.acts().transpose(1, 2))


def _linear_layer(calls: list[_Call], d_in: int, b: int, k: int, weight: bool, bias: bool,
                  what: str) -> tuple[Tensor, Finish]:
    """A Linear / Conv2d: Σ over its parameters of ||record i's gradient sum over its rows||² and the clipped sum.

    The weight's norms by the Gram trick Σ_{p,p'} (a_p·a_p')(g_p·g_p') over the record's positions (its K
    rows' and all calls' positions together), or from the per-row gradients g aᵀ summed over the record's rows,
    whichever takes fewer multiply-adds. The clipped sum (``finish(coef)``, coef [b] = clip factor / K) is
    Σ_i coef_i · (record i's gradient sum): from the kept per-record gradients (direct), or one contraction
    Σ_{n,p} coef_n g_np a_npᵀ (Gram); either way no second backward pass (book-keeping).
    """
    d_out = calls[0].g.shape[1]
    total = torch.zeros(b, device=calls[0].g.device, dtype=calls[0].g.dtype)
    kept: dict[str, Tensor] = {}
    gram = False
    if weight:
        rows_per_record = sum((k if c.g.shape[0] == b * k else 1) * c.g.shape[2] for c in calls)
        gram_cost = rows_per_record * rows_per_record * (d_in + d_out)
        direct_cost = rows_per_record * d_in * d_out + len(calls) * d_in * d_out
        gram = gram_cost < direct_cost
        if gram:
            acts = torch.cat([_record_positions(c.acts(), b, k, what) for c in calls], 2)
            grads = torch.cat([_record_positions(c.g, b, k, what) for c in calls], 2)
            gram_a = torch.bmm(acts.transpose(1, 2), acts)
            gram_g = torch.bmm(grads.transpose(1, 2), grads)
            total += (gram_a * gram_g).sum((1, 2))
        else:
            w: Tensor | None = None
            for c in calls:
                part = _per_row_to_record(c.per_row(), b, k, what)  # [b, d_out, d_in]
                w = part if w is None else w + part
            kept["weight"] = w
            total += w.pow(2).sum((1, 2))
    if bias:
        s: Tensor | None = None
        for c in calls:
            part = _per_row_to_record(c.g.sum(2), b, k, what)
            s = part if s is None else s + part
        kept["bias"] = s
        total += s.pow(2).sum(1)

    def finish(coef: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if weight and gram:
            out["weight"] = sum(torch.einsum("nop,ndp->od", c.g * _row_coefficients(coef, c.g.shape[0], b, k)
                                             .to(c.g.dtype).view(-1, 1, 1), c.acts()) for c in calls)
        elif weight:
            out["weight"] = torch.einsum("b,bod->od", coef.to(kept["weight"].dtype), kept["weight"])
        if bias:
            out["bias"] = coef.to(kept["bias"].dtype) @ kept["bias"]
        return out

    return total / (k * k), finish


class GhostBackend:
    """Fast gradient clipping: per-record norms from layer inputs and output gradients, then one weighted backward."""

    name = "ghost"

    def __init__(self, net: nn.Module, params: Sequence[nn.Parameter]) -> None:
        reason = ghost_support(net, params)
        if reason:
            raise SpecError(f"dp-sgd: ghost clipping cannot serve this model: {reason}")
        _no_inplace(net)
        self.layers, _ = _owners(net, params)
        self.trainable = {id(p) for p in params}
        self.calls: dict[nn.Module, list[tuple[Tensor, Tensor, int, int]]] = {}
        self.recording = False
        self.handles = [m.register_forward_hook(self._capture) for m in self.layers]

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.recording:
            if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
                raise PrivacyError(f"dp-sgd ghost: {type(module).__name__} was called without a tensor input/output")
            # The versions: an in-place change of either tensor after this call would make the norms wrong.
            self.calls.setdefault(module, []).append((args[0].detach(), output, args[0]._version, output._version))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.calls = {}

    def clipped_sum(self, objective: Any, net: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor,
                    k: int, clip: float, generator: torch.Generator) -> list[Tensor]:
        b = len(x)
        self.calls = {}
        self.recording = True
        try:
            rows = objective.losses(net, x, y, k, generator)
        finally:
            self.recording = False
        _check_rows(rows, b, k)
        try:
            calls = [(m, a, out) for m, seen in self.calls.items() for a, out, _, _ in seen]
            for m, seen in self.calls.items():
                if any(a._version != va or out._version != vo for a, out, va, vo in seen):
                    raise PrivacyError(f"dp-sgd ghost: the input or output of a {type(m).__name__} was modified in "
                                       "place after the layer ran; its per-record norms would be wrong (use hooks)")
            outputs = [out for _, _, out in calls]
            # Only the gradients w.r.t. the layers' outputs: no parameter gradient, no second pass.
            grads = torch.autograd.grad(rows.sum(), outputs, allow_unused=True) if outputs else ()
            norm2 = torch.zeros(b, device=rows.device, dtype=torch.float32)
            by_module: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
            for (m, a, _out), g in zip(calls, grads, strict=True):
                if g is not None:
                    by_module.setdefault(m, []).append((a, g))
            finishers = []
            for m, seen in by_module.items():
                part, finish = self._layer(m, seen, b, k)
                norm2 += part.float()
                finishers.append((m, finish))
            # Record i's clipped mean gradient is clip_i · (Σ_k g_ik) / K: one coefficient per record.
            coef = clip_factors(norm2.sqrt(), clip) / k
            result: dict[int, Tensor] = {}
            for m, finish in finishers:
                for pname, grad in finish(coef).items():
                    result[id(m._parameters[pname])] = grad
            return [result[id(p)].reshape(p.shape).to(p.dtype) if id(p) in result else torch.zeros_like(p)
                    for p in params]
        finally:
            self.calls = {}

    def _layer(self, m: nn.Module, seen: list[tuple[Tensor, Tensor]], b: int, k: int) -> tuple[Tensor, Finish]:
        """Σ over m's trainable parameters of ||record i's mean gradient||² [b], and how to finish its clipped sum."""
        name = type(m).__name__
        weight = m._parameters.get("weight") is not None and id(m._parameters["weight"]) in self.trainable
        bias = m._parameters.get("bias") is not None and id(m._parameters["bias"]) in self.trainable
        if isinstance(m, nn.Linear | nn.Conv2d):
            d_in = m.in_features if isinstance(m, nn.Linear) \
                else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            return _linear_layer([_Call(m, a, g) for a, g in seen], d_in, b, k, weight, bias, name)
        if isinstance(m, nn.Embedding):
            return self._embedding(m, seen, b, k, weight)
        # GroupNorm / LayerNorm: exact per-row gradients (C or normalized_shape numbers per row: small)
        w_sum: Tensor | None = None
        b_sum: Tensor | None = None
        for a, g in seen:
            if isinstance(m, nn.GroupNorm):
                # InstanceNorm: its channels-last CPU path (torch's kernel is ~1.4-4x slower on these maps)
                xhat = normalise(a, m.eps) if isinstance(m, InstanceNorm) \
                    else F.group_norm(a, m.num_groups, eps=m.eps)
                dims = tuple(range(2, a.ndim))
                gw, gb = (g * xhat).sum(dims), g.sum(dims)
            else:
                xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
                lead = tuple(range(1, a.ndim - len(m.normalized_shape)))
                gw, gb = (g * xhat).sum(lead), g.sum(lead)
            gw, gb = _per_row_to_record(gw, b, k, name), _per_row_to_record(gb, b, k, name)
            w_sum = gw if w_sum is None else w_sum + gw
            b_sum = gb if b_sum is None else b_sum + gb
        total = torch.zeros(b, device=seen[0][1].device, dtype=seen[0][1].dtype)
        if weight:
            total += w_sum.flatten(1).pow(2).sum(1)
        if bias:
            total += b_sum.flatten(1).pow(2).sum(1)

        def finish(coef: Tensor) -> dict[str, Tensor]:
            out = {}
            if weight:
                out["weight"] = torch.einsum("b,b...->...", coef.to(w_sum.dtype), w_sum)
            if bias:
                out["bias"] = torch.einsum("b,b...->...", coef.to(b_sum.dtype), b_sum)
            return out

        return total / (k * k), finish

    @staticmethod
    def _embedding(m: nn.Embedding, seen: list[tuple[Tensor, Tensor]], b: int, k: int,
                   weight: bool) -> tuple[Tensor, Finish]:
        """An Embedding: ||Σ_p e_{idx_p} g_pᵀ||² = Σ_{p,p'} [idx_p = idx_p'] (g_p·g_p') over the record's positions."""
        name = "Embedding"
        flat = []  # per call: indices [n, P], output gradients [n, P, d] (the padding row's masked out)
        for a, g in seen:
            idx = a.reshape(a.shape[0], -1)
            gr = g.reshape(g.shape[0], -1, g.shape[-1])
            if m.padding_idx is not None:  # the padding row never gets a gradient
                gr = gr * (idx != m.padding_idx).unsqueeze(-1).to(gr.dtype)
            flat.append((idx, gr))
        idx_all = torch.cat([_record_positions(i.unsqueeze(1), b, k, name)[:, 0] for i, _ in flat], 1)
        g_all = torch.cat([_record_positions(gr.transpose(1, 2), b, k, name).transpose(1, 2) for _, gr in flat], 1)
        same = (idx_all.unsqueeze(2) == idx_all.unsqueeze(1)).to(g_all.dtype)
        total = (same * torch.bmm(g_all, g_all.transpose(1, 2))).sum((1, 2)) if weight \
            else torch.zeros(b, device=g_all.device, dtype=g_all.dtype)

        def finish(coef: Tensor) -> dict[str, Tensor]:
            if not weight:
                return {}
            out = torch.zeros_like(m.weight)
            for idx, gr in flat:
                c = _row_coefficients(coef, idx.shape[0], b, k).to(gr.dtype).view(-1, 1, 1)
                out.index_add_(0, idx.reshape(-1), (gr * c).reshape(-1, gr.shape[-1]))
            return {"weight": out}

        return total / (k * k), finish


# ----------------------------------------------------------------------------------------------- functorch


class _RowLosses(nn.Module):
    """``objective.row_losses(net, *rows)`` as a module, so torch.func.functional_call can swap net's parameters."""

    def __init__(self, net: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.net = net
        self.fn = fn

    def forward(self, *rows: Tensor) -> Tensor:
        return self.fn(self.net, *rows)


class FunctorchBackend:
    """``torch.func.vmap(grad(mean of a record's K row losses))``: every record's full gradient, then clip and sum."""

    name = "functorch"

    def __init__(self, net: nn.Module, params: Sequence[nn.Parameter]) -> None:
        ids = {id(p): i for i, p in enumerate(params)}
        self.names: list[str] = []
        order: dict[str, int] = {}
        for name, p in net.named_parameters():
            if id(p) in ids:
                self.names.append(name)
                order[name] = ids[id(p)]
        if len(self.names) != len(params):
            raise SpecError("dp-sgd functorch: a trainable parameter is not a (unique) parameter of the network")
        self.order = order

    def close(self) -> None:
        pass

    def clipped_sum(self, objective: Any, net: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor,
                    k: int, clip: float, generator: torch.Generator) -> list[Tensor]:
        from torch.func import functional_call, grad, vmap

        reason = functorch_support(objective)
        if reason:
            raise SpecError(f"dp-sgd functorch: {reason}")
        b = len(x)
        rows = objective.draw_rows(x, y, k, generator)
        for r in rows:
            if r.shape[0] != b * k:
                raise PrivacyError(f"dp-sgd functorch: draw_rows gave a tensor of {r.shape[0]} rows for {b} "
                                   f"records x multiplicity {k}; every one must have one row per (record, k)")
        grouped = tuple(r.reshape(b, k, *r.shape[1:]) for r in rows)
        wrapper = _RowLosses(net, objective.row_losses)
        trained = {f"net.{n}": params[self.order[n]].detach() for n in self.names}

        def record_loss(theta: dict[str, Tensor], *record_rows: Tensor) -> Tensor:
            losses = functional_call(wrapper, theta, record_rows, strict=False)
            return losses.mean()  # the mean of the K rows: the record's gradient before clipping

        per_record = vmap(grad(record_loss), in_dims=(None, *([0] * len(grouped))), randomness="error")(
            trained, *grouped)
        ordered = [per_record[f"net.{n}"] for n in sorted(self.names, key=self.order.__getitem__)]
        return clipped_per_example_sum(ordered, clip)
