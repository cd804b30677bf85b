"""Time the DM authors' distillation loop (VICO-UoE/DatasetCondensation ``main_DM.py``) on this machine, so that
issue 22's "2x faster than the reference" has a side-by-side reference figure.

The authors' code is NOT in this repository: point ``--reference-dir`` at a local checkout of their repository
(it imports their ``networks.ConvNet`` via ``utils.get_network`` and their ``utils.DiffAugment`` /
``ParamDiffAug``). What this script adds is the data and a timer: MNIST from ``$DPDISTILL_DATA`` normalised as
their ``get_dataset`` does (ToTensor, Normalize(0.1307, 0.3081)), and ``main_DM.py``'s "Train synthetic data"
step for a ConvNet, line for line: a fresh ``get_network('ConvNet')`` with frozen parameters, then per class
``get_images(c, batch_real)`` (numpy permutation of the class's index list), the class's synthetic images,
``DiffAugment`` of both with one seed, ``embed(real).detach()`` and ``embed(syn)``, the squared mean-feature
distance summed over classes, ``zero_grad`` / ``backward`` / ``step`` of SGD(lr 1, momentum 0.5) on the images.
Their evaluation passes are not timed (the product's figure excludes evaluation too). One deviation, needed on
torch 2.x: each embed input is re-laid out as NCHW first (see the comment in the loop).

    .venv/bin/python benchmarks/time_reference_dm.py --reference-dir ~/src/DatasetCondensation --threads 2

Prints one JSON line: seconds per iteration (median and mean over ``--iterations`` after ``--warmup``).
bench_speed.py ``--only dm_reference --reference-dir DIR`` runs it and records the figure in speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-dir", type=Path, required=True, help="a checkout of the DM authors' repository")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--dsa-strategy", default="color_crop_cutout_flip_scale_rotate")
    args = ap.parse_args()
    ref = args.reference_dir.expanduser().resolve()
    for name in ("networks.py", "utils.py"):
        if not (ref / name).is_file():
            raise SystemExit(f"--reference-dir {ref}: no {name} (expected a checkout of the DM authors' code)")
    data_root = os.environ.get("DPDISTILL_DATA")
    if not data_root:
        raise SystemExit("DPDISTILL_DATA: not set (the folder holding MNIST/raw)")

    import numpy as np
    import torch
    from torchvision import datasets

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ref))
    from utils import DiffAugment, ParamDiffAug, get_network  # the authors' code

    train = datasets.MNIST(data_root, train=True, download=False)
    images_all = ((train.data.float() / 255.0 - 0.1307) / 0.3081).unsqueeze(1)  # ToTensor + Normalize
    labels_all = train.targets.tolist()
    num_classes, channel, im_size = 10, 1, (28, 28)
    indices_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, lab in enumerate(labels_all):
        indices_class[lab].append(i)

    def get_images(c: int, n: int) -> torch.Tensor:  # main_DM.py's, verbatim
        idx_shuffle = np.random.permutation(indices_class[c])[:n]
        return images_all[idx_shuffle]

    dsa_param = ParamDiffAug()
    image_syn = torch.randn(size=(num_classes * args.ipc, channel, im_size[0], im_size[1]), dtype=torch.float,
                            requires_grad=True)
    for c in range(num_classes):
        image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data
    optimizer_img = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    optimizer_img.zero_grad()

    times = []
    for it in range(args.warmup + args.iterations):
        started = time.perf_counter()
        net = get_network("ConvNet", channel, num_classes, im_size)
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False
        # One deviation, needed on today's torch: with one channel, DiffAugment's crop can return NHWC strides
        # that also pass as contiguous, the convolutions then answer in channels-last and ConvNet.embed's
        # .view fails. The input is re-laid out as NCHW (a copy of a 1-channel batch: negligible).
        def embed(x: torch.Tensor, net: torch.nn.Module = net) -> torch.Tensor:
            return net.embed(x.clone(memory_format=torch.contiguous_format))
        loss = torch.tensor(0.0)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc].reshape((args.ipc, channel, im_size[0], im_size[1]))
            seed = int(time.time() * 1000) % 100000
            img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=dsa_param)
            img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=dsa_param)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        loss.item()
        if it >= args.warmup:
            times.append(time.perf_counter() - started)
    print(json.dumps({"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                      "iterations": len(times), "threads": args.threads, "ipc": args.ipc,
                      "batch_real": args.batch_real, "reference_dir": str(ref)}))


if __name__ == "__main__":
    main()
