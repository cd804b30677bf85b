"""Benchmark: DP image synthesis on MNIST (DPImageBench's non-diffusion methods) at ε = 1 and ε = 10.

For each method and ε (δ = 1e-5, add-or-remove-one, sensitive set = MNIST's 55,000-image train split, the
5,000-image validation split held out as DPImageBench does): fit with the method's code defaults, generate
60,000 labelled images (6,000 per class), then
- utility: ConvNets (DC's, width 32, depth 3, instance norm; SGD lr 0.01, 3 epochs, batch 256), one per seed
  (3 by default), trained on the 60,000 synthetic images and tested on the real 10,000-image MNIST test set:
  accuracy mean ± std over the seeds;
- fidelity: FID / IS / precision-recall (k=3) against 10,000 real test images with the DOMAIN extractor
  (ConvNet trained on public glyphs; see dpdistill.evaluation.extractors), so FIDs are not comparable with
  Inception FIDs such as DPImageBench's.
Wall times on a shared 2-core machine with ONE torch thread (``--threads``; other jobs ran beside it, see
the load_avg column), so they are upper bounds for an idle 2-core machine.

    DPDISTILL_DATA=../shared/data .venv/bin/python benchmarks/bench_synthesis.py --methods dp-merf --eps 10 1

Rows accumulate in results/synthesis.json (one row per method and ε; a rerun replaces its row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import RESULTS, record  # noqa: E402

# DPImageBench's published MNIST accuracy (%, its own classifiers, no pretraining). Only figures checked
# against the paper are entered; None means "not entered here" (see results/synthesis.md).
PUBLISHED: dict[tuple[str, float], float | None] = {("dp-merf", 10.0): 81.3}

COMMAND = "DPDISTILL_DATA=../shared/data python benchmarks/bench_synthesis.py --methods <m...> --eps 10 1"
COLUMNS = ["method", "epsilon", "accuracy", "published_acc_pct", "fid_domain", "is_domain", "precision", "recall",
           "ledger_epsilon", "noise", "fit_s", "generate_s", "fidelity_s", "utility_s", "load_avg", "options"]


def _say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def run_one(method: str, eps: float, args: argparse.Namespace) -> dict:
    from dpdistill import data, synthesis
    from dpdistill.evaluation.extractors import get_extractor
    from dpdistill.evaluation.fidelity import evaluate_fidelity
    from dpdistill.evaluation.utility import evaluate_utility
    from dpdistill.privacy import PrivacyLedger

    info = data.get("mnist").info
    train = data.load("mnist", "train", root=args.root)
    test = data.load("mnist", "test", root=args.root)
    options = json.loads(args.options) if args.options else {}
    synth = synthesis.create(method, channels=1, image_size=28, num_classes=10, seed=args.seed, **options)
    ledger = PrivacyLedger(None, eps, 1e-5, n_records=len(train))
    _say(f"{method} ε={eps}: fit")
    t0 = time.perf_counter()
    report = synth.fit(train, ledger, progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, labels = synth.generate(n_per_class=args.n_per_class, seed=args.seed)
    gen_s = time.perf_counter() - t0
    _say(f"{method} ε={eps}: fit {fit_s:.0f} s; fidelity")
    t0 = time.perf_counter()
    fid = evaluate_fidelity(test.images, images, get_extractor("domain", image_size=28), max_samples=10_000)
    fid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _say(f"{method} ε={eps}: fidelity {fid_s:.0f} s; utility")
    seeds = tuple(args.seed * 1000 + i for i in range(args.seeds))
    util = evaluate_utility(images, labels, test.images, test.labels, num_classes=10, model="convnet",
                            model_kwargs={"width": 32, "depth": 3}, seeds=seeds, epochs=args.epochs,
                            batch_size=256, lr=0.01, mean=info.mean, std=info.std, progress=False,
                            num_threads=args.threads)
    util_s = time.perf_counter() - t0
    published = PUBLISHED.get((method, eps))
    return {
        "method": method, "epsilon": eps, "acc_pct": round(100 * util.mean, 2),
        "acc_std_pct": round(100 * util.std, 2), "accuracies_pct": [round(100 * a, 2) for a in util.accuracies], "accuracy": f"{100 * util.mean:.2f} ± {100 * util.std:.2f}",
        "published_acc_pct": "" if published is None else published,
        "fid_domain": round(fid.fid, 2), "is_domain": round(fid.inception_score, 2),
        "precision": round(fid.precision, 3), "recall": round(fid.recall, 3), "extractor": fid.extractor,
        "ledger_epsilon": round(report.epsilon, 4), "delta": 1e-5,
        "noise": ", ".join(f"{k}={v:.4g}" for k, v in report.noise.items()),
        "mechanisms": report.mechanisms, "fit_s": round(fit_s, 1), "generate_s": round(gen_s, 1),
        "fidelity_s": round(fid_s, 1), "utility_s": round(util_s, 1), "load_avg": round(os.getloadavg()[0], 1),
        "options": json.dumps(options) if options else "defaults", "n_synthetic": len(labels),
        "n_sensitive": len(train), "eval": f"convnet w32 d3, {args.epochs} epochs, seeds {list(seeds)}",
        "threads": args.threads,
    }


NOTES = """Setup. Sensitive set: MNIST train split (55,000 images; 5,000 held out for validation as DPImageBench does),
δ = 1e-5, add-or-remove-one, ε = the ledger's PLD total (ledger_epsilon). Each method runs with its code
defaults unless the options column says otherwise, and releases 60,000 synthetic images (6,000 per class).
Utility: DC ConvNet (width 32, depth 3, instance norm), SGD lr 0.01, 3 epochs, batch 256, trained on the
60,000 synthetic images and tested on the real 10,000-image test set; accuracy is mean ± population std over
the seeds in the eval column (per-seed figures in synthesis.json). No model selection on any real split.
Fidelity: FID / IS / precision-recall (k = 3) against 10,000 real TEST images with the DOMAIN extractor
convnet-glyphs-w32d3-28px-e3-s0 (DC ConvNet trained 3 epochs on public rendered glyphs). These FIDs are not
comparable with Inception-v3 FIDs such as DPImageBench's, nor across extractors.
Timing. One torch thread on a 2-core machine SHARED with other jobs (other engineers' earlier, dpdistill's own
parallel benchmarks for the DP-GAN ε = 1 and GS-WGAN rows): load_avg is the 1-min load average when the row
finished (2-13 during these runs, i.e. up to 6 runnable jobs per core), so every *_s column
is an upper bound for an idle 2-core machine. fit_s is the synthesiser alone (the issue's DP-MERF target:
≥ 80 % at ε = 10 within 10 minutes).

Comparison with DPImageBench (published_acc_pct). Only DP-MERF at ε = 10, 81.3 %, is entered: it is the
figure the issue quotes; DPImageBench's other MNIST figures could not be checked against the paper offline,
so they are left blank rather than quoted from memory. Our DP-MERF is about 9 points above 81.3 %. Likely
reasons, none measured here: (1) the classifier: DPImageBench trains its own classifiers (WRN / ResNet /
ResNeXt) and selects with a DP validation protocol, we train a small ConvNet for 3 epochs with no selection;
(2) the release: DPImageBench's DP-MERF releases a mean embedding with replace-one sensitivity 2/n, we release
per-class sums and counts with add-or-remove sensitivity 1 (Appendix A's conversion): about half the noise
for the same ε number, but under the weaker relation (our add-or-remove ε implies replace-one 2ε); (3) generator, bandwidth (6, chosen on public glyphs) and 10,000 features. At ε = 1
DP-MERF loses almost nothing: with ~5,500 records per class the noise on the sums (σ = 3.7) is small next to
the signal, and the generator's kernel-matching error dominates; DPImageBench makes the same observation
(methods that noise low-dimensional features are little affected by ε).

Other methods. DP-NTK (86.96 / 86.24 % at ε = 10 / 1) and DP-Kernel (89.87 / 88.88 %) sit below DP-MERF
here; all three noise a low-dimensional released statistic and lose at most about one point from ε = 10 to
ε = 1, DPImageBench's observation about feature-noise methods. Their published MNIST accuracies are not
entered for the reason above, so no per-method gap is claimed.

DP-GAN (47.4 % at ε = 10, domain FID 45.9) is far behind: 2,000 DP-SGD discriminator steps of batch 256 (about
9 epochs) from scratch, without public pretraining, are a short schedule for a GAN under DP-SGD, and DPImageBench
trains its GANs much longer; this row measures our default configuration, not the method's ceiling. At ε = 1
(σ = 1.06 instead of 0.49 for the same 2,000 steps) it reaches 49.0 ± 1.0 %, no worse than at ε = 10: with this
short schedule the GAN's training, not the noise, limits it (the FID, 71 against 46, does show the extra noise).

GS-WGAN (defaults: K = 100 subset discriminators warmed up 100 steps each, then 2,000 sanitised generator steps
of B = 32 rows) stays at chance (9.3 % at ε = 10, domain FID 70.5). The reason is the accounting, not a bug we
know of: we charge each step once with the whole B x d gradient matrix as the release (sensitivity 2C·√B, since
one record can change D_j and so every row), where the paper composes B·steps per-row releases, which
under-counts. For the same ε our noise on the generator's mean gradient is 2·m·C/√B with m the calibrated
multiplier: 0.21 C at ε = 10 (m = 0.60) and 0.66 C at ε = 1 (m = 1.85), against about 0.03 C in the paper's
setting (σ = 1.07 per row, B = 32). Because that noise falls as 1/√B for a fixed (q, steps), what would move
it is a much larger B (about 1,000 generated rows per step to reach the paper's noise level honestly), more
steps, or a larger K; each costs CPU hours here. At ε = 1 (measured 2026-11-30, 3 seeds) it is at chance too:
8.7 ± 2.3 %, domain FID 78.9 against 70.5 at ε = 10, as the three times larger noise on the mean gradient
(0.66 C) predicts. Fit 3,025 s on one thread while three other dpdistill benchmarks shared the 2 cores.

DPImageBench's repository (README and instruction files, read
offline through the search tool) carries no per-method accuracy table, so no published figure beyond the
issue's 81.3 % is entered. The DP-MERF ε = 1 row was re-run on 2026-11-30 with per-seed accuracies recorded."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dp-merf", "dp-ntk", "dp-kernel", "dp-gan", "gs-wgan"])
    parser.add_argument("--eps", nargs="+", type=float, default=[10.0, 1.0])
    parser.add_argument("--root", default=os.environ.get("DPDISTILL_DATA", str(Path(__file__).resolve().parents[1]
                                                                               / ".." / "shared" / "data")))
    parser.add_argument("--n-per-class", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--seeds", type=int, default=3, help="utility classifiers (accuracy mean ± std)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="", help="JSON method options (overrides of the code defaults)")
    parser.add_argument("--record-only", action="store_true", help="rewrite synthesis.md from the JSON rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "synthesis.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    if args.record_only:
        record("synthesis", COMMAND, rows, COLUMNS, NOTES)
        return
    for method in args.methods:
        for eps in args.eps:
            row = run_one(method, eps, args)
            print(json.dumps(row), flush=True)
            # Re-read: another benchmark process may have recorded rows meanwhile.
            rows = json.loads(path.read_text())["rows"] if path.exists() else []
            rows = [r for r in rows if (r["method"], r["epsilon"]) != (method, eps)] + [row]
            rows.sort(key=lambda r: (r["method"], -r["epsilon"]))
            record("synthesis", COMMAND, rows, COLUMNS, NOTES)


if __name__ == "__main__":
    main()
