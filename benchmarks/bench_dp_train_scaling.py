"""Benchmark: DP-SGD steps per second on 1 and N Ray Train workers (runtime/dp_train.py), CPU or GPU.

    .venv/bin/python benchmarks/bench_dp_train_scaling.py                      # convnet, 1 and 2 CPU workers
    .venv/bin/python benchmarks/bench_dp_train_scaling.py --objective unet     # the diffusion UNet (DPDM loss)
    .venv/bin/python benchmarks/bench_dp_train_scaling.py --device cuda --workers 1,2,4 --objective unet
    .venv/bin/python benchmarks/bench_dp_train_scaling.py --address HOST:6379 ...   # an existing cluster

Each worker count is one ``fit_dp_sgd(executor="ray-train")`` of the same schedule (the same global expected
batch q·n, split over the workers' shards). Steps per second are timed inside the workers, on rank 0, between
the end of a warm-up step and the last step (``on_step``'s elapsed_s), so Ray Train's start-up (worker
processes, the process group) is excluded; the whole fit's wall time, start-up included, is reported beside it.
CPU workers use ``--threads`` torch threads each (1 by default: the issue's "one thread each"); ``--device cuda``
gives every worker one GPU and nccl. The data are random images of MNIST's shape (throughput does not depend on
the pixels); nothing here is a privacy result. Results: results/dp_train_scaling_<objective>_<device>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _record import record  # noqa: E402

from dpdistill.evaluation.training import THREADS_ENV  # noqa: E402
from dpdistill.privacy.noise import PrivacyRandomness  # noqa: E402
from dpdistill.runtime.cluster import ray_session  # noqa: E402
from dpdistill.runtime.dp_train import fit_dp_sgd  # noqa: E402
from dpdistill.training.dp_sgd import ClassifierObjective, DPSGDSchedule  # noqa: E402


@dataclass(frozen=True)
class StepClock:
    """on_step hook (runs in the workers): rank 0 appends "step elapsed_s" to ``path`` (step numbers and
    times only)."""

    path: str

    def __call__(self, step: int, info: dict) -> None:
        if info["rank"] == 0:
            with open(self.path, "a") as f:
                f.write(f"{step} {info['elapsed_s']:.6f}\n")


def make_objective(name: str, device: str, width: int):
    if name == "convnet":
        return ClassifierObjective(model="convnet", channels=1, num_classes=10, image_size=28,
                                   options=(("width", width), ("depth", 3)), device=device)
    if name == "unet":
        from dpdistill.synthesis.diffusion.objective import DiffusionObjective
        from dpdistill.synthesis.diffusion.unet import UNetConfig

        c = width
        return DiffusionObjective(unet=UNetConfig(block_out_channels=(c, 2 * c, 2 * c), norm_num_groups=min(16, c)),
                                  device=device)
    raise SystemExit(f"--objective: expected convnet or unet, got {name!r}")


def steps_per_second(clock: Path, warmup: int) -> float:
    times = dict(tuple(map(float, line.split())) for line in clock.read_text().splitlines())
    last = max(times)
    return (last - warmup) / (times[last] - times[warmup])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", default="convnet", choices=("convnet", "unet"))
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, e.g. 1,2,4")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed (first-call set-up)")
    ap.add_argument("--records", type=int, default=8192, help="size of the (random) data set n")
    ap.add_argument("--batch", type=int, default=256, help="expected global batch q*n")
    ap.add_argument("--multiplicity", type=int, default=1)
    ap.add_argument("--width", type=int, default=32, help="convnet width / UNet base channels")
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    os.environ[THREADS_ENV] = str(args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.records, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (args.records,), generator=g)
    schedule = DPSGDSchedule(sigma=1.0, q=args.batch / args.records, steps=args.steps, clip=1.0,
                             n_records=args.records, lr=1e-3, multiplicity=args.multiplicity,
                             max_physical_batch=max(args.batch, 64) * args.multiplicity)
    objective = make_objective(args.objective, args.device, args.width)
    rows = []
    cpus = max(workers) * args.threads if args.device == "cpu" else None
    with ray_session(args.address, num_cpus=cpus), tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            clock = Path(tmp) / f"clock-{n}.txt"
            t0 = time.perf_counter()
            fit_dp_sgd(objective, None, images, labels, schedule, PrivacyRandomness.secret(), num_workers=n,
                       use_gpu=args.device == "cuda", executor="ray-train", storage_path=Path(tmp) / "train",
                       run_name=f"bench-{n}", on_step=StepClock(str(clock)))
            wall = time.perf_counter() - t0
            sps = steps_per_second(clock, args.warmup)
            rows.append({"workers": n, "steps_per_s": sps, "fit_wall_s": wall})
            print(f"{n} worker(s): {sps:.3f} steps/s ({wall:.1f} s for the fit, start-up included)", flush=True)
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["speedup"] = r["steps_per_s"] / base
    load = os.getloadavg()[0]
    notes = (f"objective {args.objective} (width {args.width}), device {args.device}, {args.threads} thread(s) per "
             f"CPU worker, n={args.records}, expected global batch {args.batch}, multiplicity "
             f"{args.multiplicity}, {args.steps} steps ({args.warmup} warm-up steps not timed); commit {commit()}, "
             f"torch {torch.__version__}; 1-min load average at the end {load:.2f} on {os.cpu_count()} cores.")
    md = record(f"dp_train_scaling_{args.objective}_{args.device}", " ".join(["python", *sys.argv]), rows,
                ["workers", "steps_per_s", "speedup", "fit_wall_s"], notes)
    print(json.dumps(rows), "\n", md)


if __name__ == "__main__":
    main()
