"""Distillation benchmark on MNIST (IPC 10, δ = 1e-5): DM, NDPDC, PSG and DP-GenG (with its ablation), ConvNet-evaluated.

Each row runs the method with the options of its job spec (``jobs/<method>-mnist.yaml``, plus ``--set``-style
overrides), trains fresh ConvNets on the released set and tests them on the real MNIST test split (mean ± std
over seeds), and records the wall time of distillation and evaluation. Rows are appended to
``results/distill.{json,md}`` as they finish, so a partial run keeps what it measured.

    python benchmarks/bench_distill.py --rows dpgeng@1,ndpdc@1,psg@1,dm --threads 1

Two halves can run side by side (``--name part1`` / ``--name part2``, then ``--merge part1,part2``);
``--set dpgeng:method.iterations=200`` overrides one method's spec only.
``--also-augment none`` evaluates every set a second time under another augmentation (extra rows marked
``[eval augment none]``): the protocol is fixed for all rows, but a comparison under another one is cheap.
``--save-sets DIR`` keeps the private rows' released sets (``DIR/<row>.pt``: images and labels by row name);
non-private sets (DM, DC) are never written.

Rows: ``<method>@<ε>`` (private), ``dm`` / ``dc`` (no privacy), ``ablation@<ε>`` (DP-GenG's DP-Init /
+DP-FM / +DP-EG; the DP-Init row is the full run's set before distillation, which is exactly what a run with
both switches off releases). Neighbouring relation: add-or-remove-one record of MNIST's 55,000-record
training split. The distillers never read the 5,000-record validation split; the evaluation models are also
scored on it (``val_acc``), the figure by which a configuration may be chosen, never by the test accuracy.
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

COLUMNS = ["row", "method", "epsilon", "acc", "acc_mean", "acc_std", "acc_by_seed", "val_acc", "distill_s", "stage_s", "eval_s",
           "eval", "ledger_epsilon", "epsilon_by_component", "settings"]


def load_spec(method: str, overrides: list[str]) -> Any:
    from dpdistill.spec import load_spec as _load

    # The history rows ran in float32, before the DM job shipped real_precision 'auto' (this script calls the
    # methods directly, so the jobs' compile field never applies here).
    pins = ["method.real_precision=float32"] if method == "dm" else []
    return _load(ROOT / "jobs" / f"{method}-mnist.yaml", [*pins, *overrides])


def evaluate(images: torch.Tensor, labels: torch.Tensor, test: Any, spec: Any, seeds: int,
             val: Any = None, augment: str | None = "spec") -> dict[str, Any]:
    """Test accuracy of ``seeds`` fresh models; with ``val``, the same models' accuracy on the validation split.

    The validation figure is what a configuration may be CHOSEN by (never the test accuracy); it costs one
    extra forward pass per model. ``augment``: the evaluation's augmentation, "spec" for the job's own.
    """
    from dpdistill.evaluation.utility import evaluate_utility

    ev = spec.evaluation
    if augment != "spec":
        ev = ev.model_copy(update={"augment": augment or False})
    started = time.perf_counter()
    res = evaluate_utility(images, labels, test.images, test.labels, num_classes=10, model=ev.model,
                           model_kwargs=dict(ev.model_options), seeds=list(range(seeds)), epochs=ev.epochs,
                           batch_size=ev.batch_size, lr=ev.lr, augment=ev.augmentation(),
                           mean=[0.1307], std=[0.3081], progress=False,
                           extra_sets={"val": (val.images, val.labels)} if val is not None else None)
    out: dict[str, Any] = {
        "acc_mean": res.mean, "acc_std": res.std, "acc": f"{100 * res.mean:.2f} ± {100 * res.std:.2f}",
        "acc_by_seed": json.dumps([round(100 * a, 2) for a in res.accuracies]),
        "eval_s": round(time.perf_counter() - started, 1),
        "eval": f"{ev.model} {dict(ev.model_options)} {ev.epochs} ep batch {ev.batch_size} augment {ev.augmentation()} x {seeds} seeds",
    }
    if val is not None:
        v = torch.tensor(res.extra["val"], dtype=torch.float64)
        out["val_acc"] = f"{100 * float(v.mean()):.2f} ± {100 * float(v.std(unbiased=False)):.2f}"
    return out


def run_row(row: str, splits: dict[str, Any], seeds: int, overrides: list[str], also_augment: list[str | None],
            save_dir: Path | None = None) -> list[dict[str, Any]]:
    from dpdistill import distill
    from dpdistill.privacy import PrivacyLedger

    name, _, eps_text = row.partition("@")
    method = "dpgeng" if name == "ablation" else name
    extra = [o.split(":", 1)[1] if ":" in o.split("=", 1)[0] else o for o in overrides
             if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] == method]
    if name == "ablation":
        extra.append("method.expert_guidance=false")
    if eps_text:
        extra.append(f"privacy.epsilon={eps_text}")
    spec = load_spec(method, extra)
    record_ = distill.get(method)
    config = record_.make_config(**spec.method.options())
    train, test, val = splits["train"], splits["test"], splits.get("val")
    kwargs: dict[str, Any] = {"seed": spec.seed, "progress": False, "mean": [0.1307], "std": [0.3081]}
    ledger = None
    if record_.private:
        ledger = PrivacyLedger(None, spec.privacy.epsilon, spec.privacy.delta or 1e-5, n_records=len(train))
        kwargs["ledger"] = ledger
    torch.manual_seed(spec.seed)
    started = time.perf_counter()
    syn = record_.run(train, config, **kwargs)
    distill_s = round(time.perf_counter() - started, 1)
    base = {"method": method, "epsilon": spec.privacy.epsilon if record_.private else "∞ (no privacy)",
            "distill_s": distill_s, "settings": json.dumps(spec.method.options(), default=str)}
    if ledger is not None:
        base["ledger_epsilon"] = round(ledger.spent_epsilon(), 4)
        base["epsilon_by_component"] = json.dumps({k: round(v, 4) for k, v in ledger.component_epsilons().items()})
    report = getattr(syn, "report", None)
    if report is not None and report.get("seconds"):
        # DP-GenG's wall seconds per stage (generate, extract, init, expert, distill): where the time goes.
        base["stage_s"] = json.dumps({k: round(v, 1) for k, v in report["seconds"].items()})
    images, labels = syn.export()
    # The label says which refinement stages ran: overrides can switch them off in a plain dpgeng row too.
    ran = [s for s, on in (("DP-FM", getattr(config, "uses_matching", False)),
                           ("DP-EG", getattr(config, "uses_expert", False))) if on]
    stages = "+DP-EG" if ran == ["DP-FM", "DP-EG"] else f"{' + '.join(ran) or 'DP-Init'} only"
    label = {"ablation": f"ablation +DP-FM ({row})", "dpgeng": f"DP-GenG, {stages} ({row})"}.get(name, row)
    sets = {label: (images, labels)}
    if report is not None and name in ("ablation", "dpgeng"):
        if name == "ablation":
            sets[f"ablation DP-Init ({row})"] = report["init_set"]
        sets[f"DP-generated at IPC ({row})"] = report["baseline"]
    if save_dir is not None and record_.private:
        # Only DP releases are saved (post-processing of the ledger's charges); DM / DC sets are not private.
        save_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: (x.detach().cpu(), y.detach().cpu()) for k, (x, y) in sets.items()},
                   save_dir / f"{row.replace('@', '_eps')}.pt")
    rows = []
    for key, (x, y) in sets.items():
        rows.append({"row": key, **base, **evaluate(x, y, test, spec, seeds, val)})
        for aug in also_augment:  # the same set under another evaluation augmentation (a protocol comparison)
            rows.append({"row": f"{key} [eval augment {aug or 'none'}]", **base,
                         **evaluate(x, y, test, spec, seeds, val, augment=aug)})
    return rows


def merge(parts: list[str], command: str, notes: str) -> None:
    """Combine the rows of results/<part>.json files (parallel runs) into results/distill.{json,md}."""
    rows: list[dict[str, Any]] = []
    for part in parts:
        rows += json.loads((RESULTS / f"{part}.json").read_text())["rows"]
    record("distill", command, rows, COLUMNS, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="dpgeng@1,ablation@1,ndpdc@1,psg@1,dm,dpgeng@10,ndpdc@10,psg@10")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="spec override for every row, or '<method>:<field>=<value>' for one method's rows")
    parser.add_argument("--name", default="distill", help="results file name (parallel parts: then --merge)")
    parser.add_argument("--merge", default="", help="comma-separated part names to merge into results/distill")
    parser.add_argument("--note", default="", help="what was reduced, appended to the notes")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the results file")
    parser.add_argument("--also-augment", default="",
                        help="comma-separated evaluation augmentations ('none', 'dsa-lite', 'dsa') under which every "
                             "set is ALSO evaluated, as extra rows")
    parser.add_argument("--save-sets", default="", help="folder to save the private rows' released sets in (.pt)")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_distill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = ("MNIST train split (55,000 records, add-or-remove-one), δ = 1e-5, IPC 10 stored images per class "
             "(DP-GenG decodes them into 40 by multi-formation, factor 2). acc: ConvNet test accuracy on the 10,000 "
             "MNIST test images, mean ± std over seeds (ddof 0). distill_s / eval_s: wall seconds on "
             f"{args.threads} thread(s) of a shared 2-core machine (other jobs, often dpdistill's own parallel "
             "benchmarks, were running: upper bounds). "
             + args.note)
    if args.merge:
        merge([p.strip() for p in args.merge.split(",") if p.strip()], command, notes)
        return
    torch.set_num_threads(args.threads)
    from dpdistill import data

    splits = data.load_splits("mnist", root=args.root)
    also = [None if a.strip() == "none" else a.strip() for a in args.also_augment.split(",") if a.strip()]
    rows: list[dict[str, Any]] = []
    old = RESULTS / f"{args.name}.json"
    if args.append and old.exists():
        rows = json.loads(old.read_text())["rows"]
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        print(f"== {row}", flush=True)
        for r in run_row(row, splits, args.seeds, args.overrides, also, Path(args.save_sets) if args.save_sets else None):
            print(json.dumps(r), flush=True)
            rows.append(r)
            record(args.name, command, rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
