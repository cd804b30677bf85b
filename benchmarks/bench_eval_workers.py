"""Seconds to evaluate a release the way jobs/dpgeng-mnist.yaml does, before and after evaluation/workers.py.

The typical job's evaluation: ConvNet width 32 (instance norm), 400 training images 1x28x28, batch 256,
dsa-lite, 300 epochs, 6 models (3 seeds on the release + 3 on its DP-generated baseline, here 6 seeds on one
set), each scored on 10k test and 5k validation images. Timing does not depend on pixel values, so the images
are random. Training: each configuration runs evaluate_utility (scoring only 10 images) at two reduced epoch
counts; the difference gives the seconds per epoch of all 6 models, the rest the fixed cost (worker start-up).
Scoring: one trained model's accuracy on the 15k images, old loop and new, times 6 models (divided by the
workers for the workers configuration). The 300-epoch figure is extrapolated from these, not measured. Seconds
are CPU seconds (the workers' shared over two cores), i.e. the wall time of a quiet 2-core machine, because on
a shared machine wall time measures the neighbours' load; wall times are recorded beside them:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval_workers.py [--epochs 5 25] [--seeds 6]

Configurations: "sequential" = the old path (workers=1, whole batches: micro_batch=None; scoring by the old loop,
chunks of 1024 in the default memory format); "sequential-fast" = workers=1 with micro-batches of 32 in
channels_last and chunked channels_last scoring; "workers" = the new default (workers=2, one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from dpdistill import models  # noqa: E402
from dpdistill.evaluation import training, utility  # noqa: E402


@torch.no_grad()
def _old_accuracy(model, images, labels, batch_size=1024, *, mean=None, std=None, device="cpu"):
    # The scoring loop before this change: whole chunks of batch_size in the default memory format.
    device = torch.device(device)
    normalise = training.Normalise(mean, std, images.shape[1], device)
    model.to(device).eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=torch.float32)
        correct += int((model(normalise(x)).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(images))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(config: str, epochs: int, seeds: int, sets) -> tuple[float, float]:
    x, y, tx, ty, _, _ = sets
    kw = dict(num_classes=10, model="convnet", model_kwargs={"width": 32}, seeds=range(seeds), epochs=epochs,
              batch_size=256, augment="dsa-lite", mean=(0.1307,), std=(0.3081,), progress=False)
    tx, ty = tx[:10], ty[:10]
    if config == "sequential":
        kw.update(workers=1, micro_batch=None)
    elif config == "sequential-fast":
        kw.update(workers=1)
    else:
        kw.update(workers=2, num_threads=1)
    start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    utility.evaluate_utility(x, y, tx, ty, **kw)
    wall, cpu, children = time.perf_counter() - start, time.process_time() - cpu, _children_cpu() - children
    # On a loaded machine wall time measures the neighbours; CPU time is what a quiet machine's wall time would
    # be: the parent's, plus the workers' shared out over the two cores they run on.
    return wall, cpu + children / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs=2, default=[5, 25])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="threads of the sequential configurations")
    parser.add_argument("--configs", nargs="+", default=["sequential", "sequential-fast", "workers"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.pop(training.THREADS_ENV, None)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    sets = (torch.rand(400, 1, 28, 28, generator=g), torch.arange(400) % 10,
            torch.rand(10_000, 1, 28, 28, generator=g), torch.arange(10_000) % 10,
            torch.rand(5_000, 1, 28, 28, generator=g), torch.arange(5_000) % 10)
    e1, e2 = args.epochs
    torch.manual_seed(0)
    net = models.get("convnet", channels=1, num_classes=10, image_size=28, width=32).eval()
    scored = torch.cat([sets[2], sets[4]]), torch.cat([sets[3], sets[5]])
    score_s = {}
    with training.thread_limit(1):
        for name, fn in (("old", _old_accuracy), ("new", training.accuracy)):
            times = []
            for _ in range(3):
                start = time.process_time()
                fn(net, *scored, mean=(0.1307,), std=(0.3081,))
                times.append(time.process_time() - start)
            score_s[name] = min(times)
    print(json.dumps({"score_15k_images_one_thread_cpu_s": score_s}), flush=True)
    rows = []
    for config in args.configs:
        with training.thread_limit(args.threads):
            (w1, t1), (w2, t2) = run(config, e1, args.seeds, sets), run(config, e2, args.seeds, sets)
        per_epoch = (t2 - t1) / (e2 - e1)
        fixed = t1 - per_epoch * e1
        scoring = args.seeds * score_s["old" if config == "sequential" else "new"]
        if config == "workers":
            scoring /= 2
        rows.append(dict(config=config, train_wall_s={e1: round(w1, 1), e2: round(w2, 1)},
                         train_cpu_s={e1: round(t1, 1), e2: round(t2, 1)},
                         per_epoch_s=round(per_epoch, 3), fixed_s=round(fixed, 1), scoring_s=round(scoring, 1),
                         extrapolated_300_epochs_s=round(fixed + 300 * per_epoch + scoring)))
        print(json.dumps(rows[-1]), flush=True)
    record = dict(rows=rows, score_15k_images_one_thread_cpu_s=score_s, seeds=args.seeds, threads=args.threads, torch=torch.__version__,
                  python=platform.python_version(), cores=len(os.sched_getaffinity(0)),
                  load_average_1min_at_end=os.getloadavg()[0],
                  commit=os.popen("git rev-parse --short HEAD").read().strip())
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
