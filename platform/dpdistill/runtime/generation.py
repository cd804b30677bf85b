"""Generation as parallel Ray tasks: a fitted synthesiser's samples, chunk by chunk, on any number of workers.

Generation is post-processing of the release (it charges nothing), so what travels to the workers is the
synthesiser's :meth:`~dpdistill.synthesis.base.Synthesizer.state` — DP outputs and public facts only, never a
sensitive record or the ledger. An iterative sampler (DDIM over a diffusion UNet: 50 network passes per image)
is what makes this worth it; for a one-pass generator it is still correct, just rarely faster.

Determinism: the labels are cut into ``chunks`` fixed-size pieces in class order, and chunk i is sampled with
seed ``seed * 1_000_003 + i``, so a given (seed, chunks) gives the same images however many workers run them
and in whatever order they finish (it differs from the one-process ``generate(seed=seed)``, which draws all
latents from one stream: choose one path per job and keep it).
"""

from __future__ import annotations

from typing import Any

import torch

from dpdistill.errors import SpecError


def chunk_seed(seed: int, index: int) -> int:
    """The latent seed of chunk ``index`` (public: generation randomness is not privacy randomness)."""
    return int(seed) * 1_000_003 + int(index)


def _generate_chunk(state: dict[str, Any], labels: torch.Tensor, seed: int, device: str,
                    threads: int) -> torch.Tensor:
    from dpdistill.synthesis.base import Synthesizer

    torch.set_num_threads(max(1, int(threads)))
    synth = Synthesizer.from_state(state, device=device)
    images, _ = synth.generate(labels, seed=seed)
    return images


def label_chunks(num_classes: int, n_per_class: int, chunks: int) -> list[torch.Tensor]:
    """``n_per_class`` labels of every class in class order, cut into ``chunks`` near-equal pieces."""
    if chunks < 1:
        raise SpecError(f"generation chunks must be >= 1, got {chunks}")
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return [c for c in torch.tensor_split(labels, min(chunks, len(labels))) if len(c)]


def generate_parallel(synth: Any, n_per_class: int, seed: int, *, chunks: int, use_ray: bool = True,
                      threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of every class from a fitted ``synth``: one Ray task per chunk (or in process).

    Each task reserves ``threads`` CPUs and, on a CUDA synthesiser, a share of a GPU. The in-process path
    (``use_ray=False``) samples the same chunks with the same seeds: the two agree image for image.
    """
    if not synth.fitted:
        raise SpecError(f"{synth.name}: generate after fit (nothing released yet)")
    pieces = label_chunks(synth.num_classes, n_per_class, chunks)
    device = torch.device(synth.device)
    if not use_ray:
        outs = [synth.generate(labels, seed=chunk_seed(seed, i))[0] for i, labels in enumerate(pieces)]
    else:
        import ray

        from dpdistill.runtime.device import ray_gpus, worker_device

        state_ref = ray.put(synth.transport_state())  # self-contained: tasks may run on any node
        task = ray.remote(num_cpus=threads, num_gpus=ray_gpus(device, len(pieces)))(_generate_chunk)
        outs = ray.get([task.remote(state_ref, labels, chunk_seed(seed, i), worker_device(device), threads)
                        for i, labels in enumerate(pieces)])
    return torch.cat(outs), torch.cat(pieces)
