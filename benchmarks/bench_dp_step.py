"""Benchmark: the cost of one DP-SGD step against a non-private step of the same model and batch, per backend.

    .venv/bin/python benchmarks/bench_dp_step.py                    # both models, 2 threads (about 2 minutes)
    .venv/bin/python benchmarks/bench_dp_step.py --models convnet --repeats 10
    .venv/bin/python benchmarks/bench_dp_step.py --unet-multiplicity 4   # DPDM's noise multiplicity on the UNet

Models (the jobs' configurations): ``convnet`` is the DP-GenG expert of jobs/dpgeng-mnist.yaml (ConvNet-3, width
32, instance norm, MNIST 28×28, expected batch 512 = DPGenGConfig.expert_batch) trained through
:class:`~dpdistill.training.dp_sgd.ClassifierObjective`; ``unet`` is the pdp-diffusion MNIST job's UNet
(jobs/synth-pdp-diffusion-mnist.yaml: block_out_channels [16, 32, 32], no attention, norm_num_groups 8, batch
256, multiplicity 1) trained through its DDPM objective.

Non-private step: ``objective.losses(...).mean().backward()`` and the optimiser step on the plain network (no
hooks), timed two ways — the batch in one forward (``non-private``) and in micro-batches of the engine's CPU
chunk (``non-private (chunks)``: the same gradient, accumulated) — and every ratio is to the FASTER of the two,
so that the chunking the engine does on CPU is not counted as a DP-SGD win. DP-SGD step, per backend
(:mod:`dpdistill.training.per_record`): the engine's clipped per-record sum over the same batch
(max_physical_batch = batch; on CPU the engine itself splits it into chunks of
:data:`~dpdistill.training.dp_sgd.CPU_CHUNK_ROWS` rows), one Gaussian draw from a PrivacyRandomness, the
division by the batch, the optimiser step: the loop body of :func:`~dpdistill.training.dp_sgd.train_dp_sgd`
without the Poisson mask (so both steps see the same records).
Each figure is the fastest of ``--repeats`` steps after ``--warmup`` untimed ones, on ``--threads`` torch threads;
the modes are timed in turns (one step of each per round) so that a shared machine's load hits them alike.
The images are random (time does not depend on the pixels); nothing here is a privacy result.
Results: results/dp_step.json / .md, with the commit, package versions and the load average.

Denormals: by default the run flushes denormal floats to zero (``torch.set_flush_denormal``) for every mode. A
freshly built ConvNet's first steps produce denormals on this CPU, and without the flush its NON-private step
varied between about 0.35 s and 6 s from step to step (wall = CPU time: the FPU's slow path), which made every
ratio meaningless; with it the step is a steady 0.35–0.4 s. ``--keep-denormals`` measures without the flush.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _record import record  # noqa: E402

from dpdistill.privacy.noise import PrivacyRandomness  # noqa: E402
from dpdistill.training.dp_sgd import (  # noqa: E402
    CPU_CHUNK_ROWS,
    ClassifierObjective,
    DPSGDSchedule,
    clipped_gradient_sum,
    make_optimizer,
    resolve_grad_sample_mode,
)
from dpdistill.training.per_record import BACKENDS, choose_backend, open_backend  # noqa: E402

COLUMNS = ["model", "batch", "K", "params", "mode", "ms_per_step", "ratio_to_non_private", "cpu_ms_per_step",
           "cpu_ratio", "auto_picks"]


def convnet_objective() -> tuple[object, int, int]:
    obj = ClassifierObjective(model="convnet", channels=1, num_classes=10, image_size=28,
                              options=(("width", 32), ("depth", 3), ("norm", "instance")))
    return obj, 512, 1


def unet_objective(multiplicity: int) -> tuple[object, int, int]:
    from dpdistill.synthesis.diffusion.objective import DiffusionObjective
    from dpdistill.synthesis.diffusion.unet import UNetConfig

    cfg = UNetConfig(block_out_channels=(16, 32, 32), attention=(False, False, False), mid_attention=False,
                     norm_num_groups=8)
    return DiffusionObjective(unet=cfg), 256, multiplicity


def _interleaved_ms(steps: dict[str, object], warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Fastest wall and process-CPU milliseconds of each step over the rounds, timed in turns (one of each per
    round), so a change of load on a shared machine hits every mode alike. The minimum, as timeit reports: other
    processes only ever add time, and on a quiet machine it is the median within a few per cent."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for mode, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    return {m: (1000.0 * min(wall[m]), 1000.0 * min(cpu[m])) for m in steps}


def bench_model(name: str, objective, batch: int, k: int, warmup: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    schedule = DPSGDSchedule(sigma=1.0, q=0.01, steps=1, clip=1.0, n_records=100 * batch, lr=1e-3,
                             multiplicity=k, max_physical_batch=batch * k)
    auto = resolve_grad_sample_mode(objective, "auto")
    rng = torch.Generator().manual_seed(1)
    noise = PrivacyRandomness.reproducible(0)

    net = objective.build().train()
    params = list(objective.trainable(net))
    opt = make_optimizer(params, schedule)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        objective.losses(net, x, y, k, rng).mean().backward()
        opt.step()

    per_chunk = max(1, CPU_CHUNK_ROWS // k)

    def plain_chunks() -> None:
        opt.zero_grad(set_to_none=True)
        for xc, yc in zip(x.split(per_chunk), y.split(per_chunk), strict=True):
            (objective.losses(net, xc, yc, k, rng).sum() / (len(x) * k)).backward()
        opt.step()

    common = {"model": name, "batch": batch, "K": k, "params": sum(p.numel() for p in params),
              "auto_picks": auto}
    steps: dict[str, object] = {"non-private": plain, "non-private (chunks)": plain_chunks}
    refused: dict[str, str] = {}
    backends = []
    for mode in BACKENDS:
        net_m = objective.build().train()
        params_m = list(objective.trainable(net_m))
        try:
            chosen = choose_backend(mode, objective, net_m, params_m)
        except Exception as err:  # a backend that cannot serve the model: say so in the table
            refused[mode] = f"refused: {err}"
            continue
        backend = open_backend(chosen, net_m, params_m)
        backends.append(backend)
        opt_m = make_optimizer(params_m, schedule)
        numels = [p.numel() for p in params_m]

        def private(net=net_m, params=params_m, opt=opt_m, backend=backend, numels=numels) -> None:
            sums = clipped_gradient_sum(objective, net, params, x, y, k, schedule.clip, rng, batch * k, backend)
            flat = torch.cat([s.reshape(-1) for s in sums])
            flat = flat + noise.gaussian(flat.shape, schedule.noise_std, flat.device, flat.dtype)
            flat = flat / schedule.expected_batch
            for p, gr in zip(params, flat.split(numels), strict=True):
                p.grad = gr.view_as(p)
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[mode] = private
    try:
        timed = _interleaved_ms(steps, warmup, repeats)
    finally:
        for backend in backends:
            backend.close()
    base = min(timed["non-private"][0], timed["non-private (chunks)"][0])
    base_cpu = min(timed["non-private"][1], timed["non-private (chunks)"][1])
    rows = []
    for mode in ["non-private", "non-private (chunks)", *BACKENDS]:
        if mode in refused:
            rows.append({**common, "mode": mode, "ms_per_step": refused[mode]})
            continue
        ms, cpu = timed[mode]
        rows.append({**common, "mode": mode, "ms_per_step": ms, "ratio_to_non_private": ms / base,
                     "cpu_ms_per_step": cpu, "cpu_ratio": cpu / base_cpu})
        print(f"{name}: {mode} {ms:.1f} ms ({ms / base:.2f}x; CPU {cpu:.1f} ms, {cpu / base_cpu:.2f}x)", flush=True)
    return rows


def _git_commit() -> str:
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=repo)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "platform"], capture_output=True, text=True,
                               cwd=repo).stdout.strip()
        return out.stdout.strip() + (" (platform/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {sys.version.split()[0]}"]
    for dist in ("torch", "opacus", "diffusers"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} absent")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="convnet,unet", help="comma-separated: convnet, unet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unet-multiplicity", type=int, default=1, help="K of the UNet rows (the job: 1; DPDM: 4)")
    ap.add_argument("--name", default="dp_step", help="results/<name>.json/.md")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="do not flush denormal floats to zero (see the module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    rows: list[dict] = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model == "convnet":
            obj, batch, k = convnet_objective()
        elif model == "unet":
            obj, batch, k = unet_objective(args.unet_multiplicity)
        else:
            raise SystemExit(f"unknown model {model!r} (convnet, unet)")
        rows += bench_model(model, obj, batch, k, args.warmup, args.repeats)
    load = os.getloadavg()[0]
    notes = (f"Commit {_git_commit()}; {_versions()}; {args.threads} torch threads; fastest of {args.repeats} steps "
             f"after {args.warmup} warm-up; 1-min load average at the end {load:.2f} on {os.cpu_count()} cores. "
             "ratio = step / the faster non-private step (one pass or chunks; same model, batch, objective), by "
             "wall time and by this process's CPU time (all threads). "
             + ("Denormals kept." if args.keep_denormals else "Denormal floats flushed to zero (all modes)."))
    md = record(args.name, " ".join(["python", *sys.argv]), rows, COLUMNS, notes)
    print(md.read_text())


if __name__ == "__main__":
    main()
