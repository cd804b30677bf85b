"""What limits DP-GenG: the generated set's two uses, one at a time replaced by REAL training images. A diagnostic.

DP-GenG reads its DP-generated set in two places: DP-Init (k-means picks become the initial distilled images)
and the feature extractors (trained on it). This benchmark runs the ε = 10 configuration of
``jobs/dpgeng-mnist.yaml`` with the DP-MERF generator and settings its rows were recorded with (no expert
guidance, 1,000 iterations, plus ``--set`` overrides), the generator charged as usual, then hands the pipeline,
for the parts ``--stand-in`` names, 500 random REAL training images per class instead of the generated set:

- ``init``: DP-Init clusters the real images; the extractors are still trained on the generated set;
- ``extractors``: the extractors are trained on the real images; DP-Init still picks generated ones;
- ``both``: a perfect generator, the ceiling of the feature matching itself (its noise, clipping, factor 2).

The stand-in reads the sensitive split outside the ledger, so NO row here is a private release: the figures
say what a better generator would be worth, nothing more. Only accuracies are written (test split, and the
validation split for choosing).

    python benchmarks/bench_dpgeng_stand_in.py --stand-in init --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import RESULTS, record  # noqa: E402
from bench_distill import evaluate, load_spec  # noqa: E402

COLUMNS = ["row", "stand_in", "acc", "acc_by_seed", "val_acc", "sigma_f", "ledger_epsilon", "distill_s", "eval",
           "settings"]
STAND_INS = ("none", "init", "extractors", "both")


def real_stand_in(train: Any, per_class: int, seed: int) -> Any:
    """``per_class`` random real training images of every class (the same draw for every stand-in mode)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([i[torch.randperm(len(i), generator=g)[:per_class]] for i in train.per_class_indices()])
    return train.subset(idx)


def run(stand_in: str, splits: dict[str, Any], overrides: list[str], seeds: int, epsilon: float) -> dict[str, Any]:
    from dpdistill import distill
    from dpdistill.distill.dpgeng import pipeline
    from dpdistill.privacy import PrivacyLedger

    train, test, val = splits["train"], splits["test"], splits["val"]
    # The generator its recorded rows ran (the job's DP-MERF before the job shipped DP-MEPF).
    spec = load_spec("dpgeng", ["method.generator=dp-merf", "method.public=null", "method.generated_per_class=500",
                                "method.extractor_epochs=3", "method.expert_guidance=false", "method.iterations=1000",
                                f"privacy.epsilon={epsilon}", *overrides])
    rec = distill.get("dpgeng")
    cfg = rec.make_config(**spec.method.options())
    ledger = PrivacyLedger(None, spec.privacy.epsilon, spec.privacy.delta or 1e-5, n_records=len(train))
    torch.manual_seed(spec.seed)
    # The pipeline's own stage (a) with its own seed, so the generated set is the one bench_distill's rows use.
    base_seed = int(torch.randint(2**31, (1,), generator=torch.Generator().manual_seed(spec.seed)))
    started = time.perf_counter()
    generated, _ = pipeline.generate_stage(train, cfg, ledger, cfg.share_generator * spec.privacy.epsilon,
                                           base_seed, torch.device("cpu"), False)
    real = real_stand_in(train, cfg.generated_per_class, 123)
    saved = pipeline.dp_init, pipeline.train_extractors
    try:
        if stand_in in ("init", "both"):
            pipeline.dp_init = lambda _generated, *a, **k: saved[0](real, *a, **k)
        if stand_in in ("extractors", "both"):
            pipeline.train_extractors = lambda _generated, *a, **k: saved[1](real, *a, **k)
        syn = rec.run(train, cfg, seed=spec.seed, progress=False, mean=[0.1307], std=[0.3081], ledger=ledger,
                      generated=generated)
    finally:
        pipeline.dp_init, pipeline.train_extractors = saved
    distill_s = round(time.perf_counter() - started, 1)
    x, y = syn.export()
    res = evaluate(x, y, test, spec, seeds, val)
    return {"row": f"DP-GenG@{epsilon:g}, DP-FM only, real stand-in for: {stand_in}", "stand_in": stand_in,
            **{k: res[k] for k in ("acc", "acc_by_seed", "val_acc", "eval")},
            "sigma_f": round(syn.report["sigma"]["feature_matching"], 4),
            "ledger_epsilon": round(ledger.spent_epsilon(), 4), "distill_s": distill_s,
            "settings": json.dumps(spec.method.options(), default=str)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in", default="init,extractors,both",
                        help=f"comma-separated, from {', '.join(STAND_INS)}")
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="dpgeng spec override")
    parser.add_argument("--name", default="dpgeng_stand_in")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the results file")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.stand_in.split(",") if m.strip()]
    bad = [m for m in modes if m not in STAND_INS]
    if bad:
        parser.error(f"--stand-in: expected {', '.join(STAND_INS)}, got {bad[0]!r}")
    command = "python benchmarks/bench_dpgeng_stand_in.py " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = ("NOT private: the stand-in reads the sensitive split outside the ledger. MNIST train split, δ = 1e-5, "
             "IPC 10 stored images per class, factor 2; the generator is fitted and charged as in a real run, so "
             "σ_F is the real runs' σ_F. Evaluation as distill_part5-8 (the job's block). One torch thread of a "
             "shared 2-core machine: wall times are upper bounds.")
    torch.set_num_threads(args.threads)
    from dpdistill import data

    splits = data.load_splits("mnist", root=args.root)
    rows: list[dict[str, Any]] = []
    old = RESULTS / f"{args.name}.json"
    if args.append and old.exists():
        rows = json.loads(old.read_text())["rows"]
    for mode in modes:
        print(f"== {mode}", flush=True)
        rows.append(run(mode, splits, args.overrides, args.seeds, args.epsilon))
        print(json.dumps(rows[-1]), flush=True)
        record(args.name, command, rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
