"""Fast embeddings for the matching distillers: channels-last networks and cache-sized chunks on the real side.

Every matcher (DM, NDPDC, DP feature matching, DP-GenG) spends most of an iteration embedding a large real
batch (DM's reference setting: 10 classes x 256 images through a width-128 ConvNet) with no gradient, and
the rest differentiating the synthetic side. Measured on 2-core AVX-512 machines (benchmarks/bench_speed.py),
these change how fast, not what is computed:

- **channels-last** memory format: oneDNN's convolutions run ~3x faster on NHWC than on NCHW tensors on CPU.
  :func:`prepare` converts a network's 4-d weights once; the inputs follow.
- **chunks of ~32 images**: a width-128 feature map of 2,560 images at 32x32 is 1.3 GB, so every elementwise op
  (norm, activation, pooling) streams main memory; a 32-image chunk stays in cache. The no-grad real side is
  simply chunked.
- **the differentiable synthetic side** (and the expert's guidance forward) is also chunked, either keeping each
  chunk's activations for the backward or with activation checkpointing
  (:func:`torch.utils.checkpoint.checkpoint`: each chunk's forward runs without keeping activations and is
  recomputed chunk by chunk in the backward, one extra forward, but forward and backward both stay in cache).
  Which wins depends on the machine's caches, not on the data: on an Intel Xeon checkpointing was ~2x faster
  end to end; on an AMD EPYC (1 MB L2 a core) it was 1.5-1.6x SLOWER (width-32 ConvNet, 400 images: 131 against
  83 ms a forward + backward; width 128, 100 images: 218 against 145 ms). So :func:`run_chunked` measures both
  once per network shape and batch shape on the machine it runs on (:func:`checkpoint_pays`, a fraction of a
  second on a fixed, data-independent probe) and keeps the faster. On CPU both give the same features and
  gradient bit for bit (the same chunks through the same kernels; tests/test_distill_embedding.py), so the
  choice never changes a result (not verified on a GPU, where kernels may be chosen differently). ``$DPDISTILL_CHUNK_CHECKPOINT`` = ``always`` / ``never`` fixes it (default ``auto``).
  Chunking is exact only for networks whose layers treat records independently: a network with batch norm in
  training mode (its statistics mix the batch) is run in one pass, as the reference does.
- **bfloat16 convolutions on the real side**, when a config asks for it (``real_precision: bfloat16``,
  :func:`low_precision`): the no-grad real forward's convolutions take bfloat16 inputs and weights and return
  float32, so norm, activation, pooling, the features and everything after them (clipping, noise) stay float32.
  On CPUs with native bf16 dot products (AVX512-BF16, AMX) the convolutions alone run ~2x faster (a 128->128
  3x3 layer: ~490 against ~245 GFLOPS on 2 AMD EPYC cores) and DM's whole width-128 real side ~1.5x (1.50 ->
  0.97 s for 2,560 images: norm, activation and pooling stay float32); the class means move by ~0.1 % relative, far
  below the spread between two halves of the same class batch (~6 %). This one changes results (rounding), so it
  is a spec field, off by default, never a silent choice. ``real_precision: auto`` (:func:`resolve_precision`)
  takes bfloat16 only on a CPU with AMX matrix tiles (``amx_bf16`` in /proc/cpuinfo), where the gain is large:
  DM's width-128 iteration 1.31 -> 0.83 s eager and 0.43 s compiled on 2 Xeon cores, at the same accuracy
  (benchmarks/results/speed.md, runs.md dm-mnist-w128-it200-bf16*); float32 elsewhere (GPUs included). The
  choice is logged once per process, and each distill run records it (``real_precision_bfloat16`` in its
  metrics, a summary row), since the spec and its hash say only 'auto'.

- **torch.compile**, when the job asks for it (``compile: true``, :mod:`dpdistill.models.compiled`): each chunk's
  ``net.embed`` / forward runs compiled code that fuses the norm, activation and pooling around each convolution
  (width-32 ConvNet, 2 threads: 1,280 real images 92 -> 56 ms, 400 synthetic images forward and backward
  96 -> 70 ms). Off by default; it moves results by float rounding only. Compiled, every forward without
  gradient (the real side, the decoupled release's sums) pads its last chunk to the full chunk with zero images
  (their outputs dropped), so no graph is compiled for, and no compile-cache entry records, a Poisson batch's
  size or a class's count.

Results equal the plain ``net.embed(x)`` up to float rounding (~1e-6; tests/test_distill_embedding.py).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpdistill.errors import SpecError
from dpdistill.models.compiled import compiled
from dpdistill.models.registry import mixes_records

__all__ = ["CHECKPOINT_ENV", "CHUNK", "channels_last", "checkpoint_pays", "embed", "embed_chunks", "embed_no_grad",
           "logits", "low_precision", "mixes_records", "prepare", "resolve_precision", "run_chunked"]

log = logging.getLogger(__name__)

Precision = Literal["float32", "bfloat16", "auto"]
PRECISIONS = ("float32", "bfloat16", "auto")

CHUNK = 32  # images per no-grad forward (cache-sized for width-128 ConvNets on 28-32 px images)
_CL = torch.channels_last
CHECKPOINT_ENV = "DPDISTILL_CHUNK_CHECKPOINT"  # auto (measure once per shape), always, never
# Above this many bytes of kept activations the synthetic side is checkpointed whatever is faster. What a ConvNet
# keeps for the backward is ~4 full-size maps per layer block (conv output, normalised map, ReLU output, pooled
# map and the smaller maps below): estimated as images x H x W x widest conv x 4 maps x 4 bytes, i.e. ~2 MB an
# image at width 128 on 32x32, so 1 GiB holds ~512 such images; a larger set would trade memory for speed.
KEEP_ACTIVATIONS_MAX_BYTES = 1 << 30
_LOW_PRECISION = "_dpdistill_low_precision"  # marks a network low_precision made
_CHOICES: dict[tuple[object, ...], bool] = {}  # (network shape, batch shape, ...) -> checkpoint is faster


def prepare(net: nn.Module) -> nn.Module:
    """``net`` with its 4-d parameters in channels-last format (in place; returned for chaining)."""
    return net.to(memory_format=_CL)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout when it is a 4-d image batch (unchanged otherwise)."""
    return x.contiguous(memory_format=_CL) if x.dim() == 4 else x


def run_chunked(fn: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, x: torch.Tensor,
                chunk: int = CHUNK) -> torch.Tensor:
    """``fn(x)`` (``fn`` is ``net``'s forward or embed) on channels-last chunks, differentiable w.r.t. ``x``.

    When a gradient is wanted, each chunk either keeps its activations for the backward or is checkpointed
    (recomputed in the backward, so its activations are used while still in cache), whichever
    :func:`checkpoint_pays` found faster on this machine; the networks here are deterministic (no dropout), so
    the recomputation gives the same values and the RNG state need not be saved. Without gradient, or for a
    network that mixes records, or a batch of at most one chunk, it is one plain call.
    """
    fn = _network_call(fn, net)
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    if not wants_grad and isinstance(fn, functools.partial) and not mixes_records(net):
        # Compiled and without gradient, the input may be sensitive (the decoupled release's per-class sums).
        return torch.cat(_padded_chunks(fn, x, chunk))
    if len(x) <= chunk or mixes_records(net) or not wants_grad:
        return fn(channels_last(x))
    if not checkpoint_pays(fn, net, x, chunk):
        return torch.cat([fn(channels_last(part)) for part in x.split(chunk)])
    return _checkpointed(fn, x, chunk)


def _network_call(fn: Callable[[torch.Tensor], torch.Tensor], net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (``net`` itself or ``net.embed``, on CPU) through torch.compile when the job asks for it
    (:func:`dpdistill.models.compiled.compiled`); any other function, or a network on an accelerator, as it is.
    A compiled call is named ``compiled_<method>`` so checkpoint_pays measures it apart from the eager one."""
    method = "forward" if fn is net else "embed" if getattr(fn, "__self__", None) is net and \
        getattr(fn, "__name__", "") == "embed" else None
    on_cpu = all(p.device.type == "cpu" for p in net.parameters())  # measured on CPU only (inductor's C++)
    if method is None or not on_cpu:
        return fn
    call = compiled(net, method)
    if not isinstance(call, functools.partial):  # not compiled: the caller's own function
        return fn
    call.__name__ = f"compiled_{method}"  # type: ignore[attr-defined]  (a functools.partial takes attributes)
    return call


def _checkpointed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([checkpoint(fn, channels_last(part), use_reentrant=False, preserve_rng_state=False)
                      for part in x.split(chunk)])


def checkpoint_policy() -> str:
    """``$DPDISTILL_CHUNK_CHECKPOINT``: auto (default), always or never; SpecError naming it otherwise. The
    runner calls this before any job's input checks, so a typo fails before anything is charged."""
    policy = os.environ.get(CHECKPOINT_ENV, "").strip().lower() or "auto"
    if policy not in ("auto", "always", "never"):
        raise SpecError(f"${CHECKPOINT_ENV}: expected auto, always or never, got {policy!r}")
    return policy


def checkpoint_pays(fn: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, x: torch.Tensor,
                    chunk: int = CHUNK) -> bool:
    """Whether checkpointed chunks are faster than chunks that keep their activations, for ``fn`` of ``net``
    on a batch shaped like ``x``, on this machine (``$DPDISTILL_CHUNK_CHECKPOINT`` = always / never decides
    instead).

    Measured once per (network layer types and parameter shapes, function, batch shape, chunk, threads) in this
    process: a forward and backward each way, twice, alternating, on a fixed probe (pixels from a private
    generator: neither the data nor any caller's RNG is touched), the gradient taken w.r.t. the probe only
    (parameters' ``.grad`` are left alone). A batch whose kept activations would exceed
    :data:`KEEP_ACTIVATIONS_MAX_BYTES` (estimated) is always checkpointed (memory).
    """
    policy = checkpoint_policy()
    if policy != "auto":
        return policy == "always"
    if _kept_bytes(net, x) > KEEP_ACTIVATIONS_MAX_BYTES:
        return True
    key = (tuple(type(m).__qualname__ for m in net.modules()), tuple(tuple(p.shape) for p in net.parameters()),
           getattr(fn, "__name__", ""), tuple(x.shape), x.dtype, x.device.type, chunk, torch.get_num_threads())
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _measure_checkpoint(fn, x, chunk)
    return choice


def _kept_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """A rough upper estimate of the activations a forward of ``x`` keeps for the backward (see
    :data:`KEEP_ACTIVATIONS_MAX_BYTES`)."""
    widest = max((m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)), default=x.shape[1])
    pixels = x.shape[-1] * x.shape[-2] if x.dim() == 4 else x[0].numel()
    return len(x) * pixels * widest * 4 * x.element_size()


def _measure_checkpoint(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> bool:
    probe = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(device=x.device, dtype=x.dtype)
    probe.requires_grad_(True)

    def seconds(checkpointed: bool) -> float:
        _sync(x.device)
        started = time.perf_counter()
        out = (_checkpointed(fn, probe, chunk) if checkpointed
               else torch.cat([fn(channels_last(part)) for part in probe.split(chunk)]))
        torch.autograd.grad(out.sum(), probe)
        _sync(x.device)
        return time.perf_counter() - started

    with torch.enable_grad():
        best = {True: float("inf"), False: float("inf")}
        for checkpointed in (False, True, False, True):
            best[checkpointed] = min(best[checkpointed], seconds(checkpointed))
    return best[True] < best[False]


def _sync(device: torch.device) -> None:
    """Wait for queued kernels (an accelerator runs asynchronously: a timing must not stop at the launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def embed(net: nn.Module, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``net.embed(x)``, differentiable (the synthetic side), in chunks (:func:`run_chunked`)."""
    return run_chunked(net.embed, net, x, chunk)  # type: ignore[arg-type]


def logits(net: nn.Module, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``net(x)``, differentiable, in chunks (:func:`run_chunked`): the expert's guidance forward."""
    return run_chunked(net, net, x, chunk)


def embed_chunks(net: nn.Module, x: torch.Tensor, chunk: int = CHUNK,
                 precision: Precision = "float32") -> list[torch.Tensor]:
    """``net.embed`` of ``x`` in consecutive chunks (no gradient): one float32 feature tensor per chunk, in order.

    ``precision`` 'bfloat16' computes the convolutions in bfloat16 (:func:`low_precision`); 'auto' picks per
    :func:`resolve_precision`. A network that mixes records (:func:`mixes_records`) gets the whole batch as one
    chunk, so its batch statistics are those of the whole batch, as without chunking.
    """
    precision = resolve_precision(precision, x.device)  # first: an empty batch must not hide a bad argument
    if len(x) == 0:
        return []
    if mixes_records(net):
        chunk = len(x)
    if precision == "bfloat16":
        net = low_precision(net)
    call = _network_call(net.embed, net) if not mixes_records(net) else net.embed  # type: ignore[arg-type]
    with torch.no_grad():
        if not isinstance(call, functools.partial):
            return [call(channels_last(part)) for part in x.split(chunk)]
        return _padded_chunks(call, x, chunk)


def _padded_chunks(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """``call`` of each ``chunk``-row piece of ``x``, the last one padded with zero images to ``chunk`` rows and the
    padding's outputs dropped (for a compiled ``call``).

    The real side's last chunk has as many images as the Poisson batch leaves over, a private quantity. A
    compiled call compiles (and caches on disk) a graph per input shape it meets, so unpadded chunks would record
    batch sizes in the compile cache; padded, every real chunk has the one public shape. The networks here treat
    records independently (chunking is refused for those that do not), so the padding changes no real row."""
    out = []
    for part in x.split(chunk):
        n = len(part)
        if n < chunk:
            part = torch.cat([part, part.new_zeros((chunk - n, *part.shape[1:]))])
        out.append(call(channels_last(part))[:n])
    return out


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> Literal["float32", "bfloat16"]:
    """The arithmetic ``precision`` stands for on ``device``: 'auto' is bfloat16 on a CPU with AMX bf16 tiles and
    float32 anywhere else (a CPU with only AVX512-BF16 dot products gained ~1.5x on DM's real side, not enough to
    make a host-dependent rounding the default; GPUs are not measured); the others stand for themselves."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        return precision  # type: ignore[return-value]
    resolved: Literal["float32", "bfloat16"] = (
        "bfloat16" if torch.device(device).type == "cpu" and cpu_has_amx() else "float32")
    if resolved not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(resolved)
        log.info("real_precision 'auto': the real side computes in %s (%s)", resolved, auto_precision_reason(device))
    return resolved


_AUTO_LOGGED: set[str] = set()


def auto_precision_reason(device: torch.device | str) -> str:
    """Why 'auto' resolves as it does on ``device``, in words (the run log's and the run summary's)."""
    if torch.device(device).type != "cpu":
        return f"device {torch.device(device).type}"
    return "the CPU has AMX bf16 tiles" if cpu_has_amx() else "no AMX bf16 tiles"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this machine's CPUs have AMX bf16 tiles (Linux: the ``amx_bf16`` flag of /proc/cpuinfo; False
    where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def embed_no_grad(net: nn.Module, x: torch.Tensor, chunk: int = CHUNK,
                  precision: Precision = "float32") -> torch.Tensor:
    """``net.embed(x)`` without gradient, computed chunk by chunk (:func:`embed_chunks`), as one tensor."""
    parts = embed_chunks(net, x, chunk, precision)
    return torch.cat(parts) if parts else x.new_zeros((0, 0))


class _BFloat16Conv(nn.Module):
    """A frozen copy of a Conv2d computed in bfloat16: input and weights rounded to bf16, output float32."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv  # kept for its hyper-parameters (and so module-type checks still see a Conv2d)
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        self.weight = conv.weight.detach().to(torch.bfloat16).contiguous(memory_format=fmt)
        self.bias = None if conv.bias is None else conv.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.padding_mode != "zeros":
            raise ValueError(f"bfloat16 convolution: padding_mode {c.padding_mode!r} is not supported")
        out = F.conv2d(x.to(torch.bfloat16), self.weight, self.bias, c.stride, c.padding, c.dilation, c.groups)
        return out.float()


def low_precision(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (for no-grad forwards) whose Conv2d layers compute in bfloat16 and return float32.

    A network this function returned is returned as it is. Only the convolutions change: normalisation,
    activations, pooling and linear layers stay float32, as do the outputs. ``net`` itself is untouched (the
    copy is cheap: a width-128 ConvNet-3 holds ~310k weights, ~1.2 MB).
    """
    if getattr(net, _LOW_PRECISION, False):  # already a copy made here: converting again would copy again
        return net
    out = copy.deepcopy(net)
    setattr(out, _LOW_PRECISION, True)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d:
                setattr(module, name, _BFloat16Conv(child))
    return out
