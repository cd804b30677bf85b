"""Does multi-formation decoding interact with the evaluation's augmentation? A diagnostic on REAL images.

DP-GenG releases factor-2 sets: each stored 28x28 image holds four 14x14 images, decoded (bilinear) into four
blurry 28x28 ones. Under the benchmark's evaluation protocol (300 epochs, `dsa-lite`), the DP-Init set of
DP-GenG scored below the generator's own 10 full-size images per class (distill_part6). This benchmark
separates the decoding from the DP pipeline: it takes 40 random REAL training images per class and evaluates

- ``full-10``: the first 10 of them per class, full size;
- ``decoded-400 (f=2)``: all 40 packed by factor 2 into 10 stored images per class, then decoded;
- ``full-40``: all 40, full size;

each with and without ``dsa-lite``, one ConvNet (width 32) per cell, scored on MNIST's VALIDATION split only
(never the test split: this informs a protocol choice).

    python benchmarks/bench_multiformation_eval.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

COLUMNS = ["set", "images", "augment", "val_acc", "eval_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_multiformation_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    from dpdistill import data
    from dpdistill.distill.multiformation import decode, pack
    from dpdistill.evaluation.utility import evaluate_utility

    splits = data.load_splits("mnist", root=args.root)
    train, val = splits["train"], splits["val"]
    g = torch.Generator().manual_seed(args.seed)
    idx40 = torch.cat([idx[torch.randperm(len(idx), generator=g)[:40]] for idx in train.per_class_indices()])
    x40, y40 = train.images[idx40], train.labels[idx40]
    x_dec, y_dec = decode(pack(x40, 2), y40[::4], 2)  # groups of 4 consecutive images share a stored image
    first10 = torch.cat([torch.arange(c * 40, c * 40 + 10) for c in range(10)])
    sets = {"full-10": (x40[first10], y40[first10]), "decoded-400 (f=2)": (x_dec, y_dec), "full-40": (x40, y40)}
    rows = []
    for name, (x, y) in sets.items():
        for aug in ["dsa-lite", None]:
            started = time.perf_counter()
            res = evaluate_utility(x, y, val.images, val.labels, num_classes=10, model_kwargs={"width": 32},
                                   seeds=[args.seed], epochs=args.epochs, batch_size=256, augment=aug,
                                   mean=[0.1307], std=[0.3081], progress=False)
            rows.append({"set": name, "images": len(x), "augment": aug or "none",
                         "val_acc": round(100 * res.mean, 2), "eval_s": round(time.perf_counter() - started, 1)})
            print(rows[-1], flush=True)
            record("multiformation_eval", command, rows, COLUMNS,
                   "40 random MNIST training images per class (seed as given); one ConvNet (width 32, instance norm) "
                   f"per cell, {args.epochs} epochs, batch 256, lr 0.01; accuracy on the 5,000-record validation "
                   "split. Wall seconds on a shared 2-core machine.")


if __name__ == "__main__":
    main()
