"""Re-score recorded releases under another evaluation protocol, through `dpdistill evaluate`.

A rescore (benchmarks/configs.yaml, ``rescores:``) names a bench_runs configuration (``of``) and ``--set``
overrides of how a release is scored (``evaluation.*``, ``threads``) and, for a synthesize configuration, of
the fresh set drawn from its released generator (``method.n_per_class``, ``method.guidance_scale``,
``method.sample_steps``, ``method.sample_eta``: post-processing as well). Each counted draw of that
configuration's row in results/runs.json (its run folder holds the release) is re-scored once with

    .venv/bin/dpdistill evaluate RUN_DIR --set ... --runs-dir DIR --no-progress

under ``nice -n 10`` with one torch thread. Re-scoring is post-processing of a DP release: nothing is charged
and the figures say only how the SAME releases score under another protocol; the figure is the mean ± std over
the source's noise draws (a one-draw reference: ± over its evaluation seeds), beside the source row's own.
This separates the evaluation protocol's share of a gap to a paper from the method's (issue 23).

    .venv/bin/python benchmarks/bench_rescore.py run NAME [--jobs 2] [--deadline 2026-12-05T01:30Z] [--snapshot HEAD]
    .venv/bin/python benchmarks/bench_rescore.py record NAME SOURCE_RUN_DIR EVALUATE_RUN_DIR
    .venv/bin/python benchmarks/bench_rescore.py render

Results: results/rescore.json (one record per re-scored draw, with the evaluate run's folder, commit and
package versions from its status.json) and results/rescore.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runs import (  # noqa: E402
    CONFIGS,
    DEFAULT_RUNS_DIR,
    RESULTS_JSON,
    VENV_BIN,
    Source,
    _mean_std,
    load_configs,
    superseded_by,
)
from bench_runs import _pct as bench_runs_pct  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RESCORE_JSON = RESULTS / "rescore.json"
RESCORE_MD = RESULTS / "rescore.md"
# A fresh draw's options: evaluate_job.GENERATION (not imported here: this script loads no torch to list or check).
ALLOWED = ("evaluation.", "threads=", "method.n_per_class=", "method.guidance_scale=", "method.sample_steps=",
           "method.sample_eta=")


def load_rescores(path: Path = CONFIGS) -> dict[str, dict[str, Any]]:
    """The named rescores, each checked: a source configuration, overrides of the evaluation only, the why."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = doc.get("rescores") or {}
    configs = doc.get("configs") or {}
    for name, r in out.items():
        missing = [k for k in ("of", "set", "description", "chosen_by") if k not in r]
        if missing:
            raise SystemExit(f"{path}: rescore {name}: missing {', '.join(missing)}")
        if r["of"] not in configs:
            raise SystemExit(f"{path}: rescore {name}: 'of: {r['of']}' is not a configuration")
        bad = [s for s in r["set"] if not s.replace(" ", "").startswith(ALLOWED)]
        if bad:
            raise SystemExit(f"{path}: rescore {name}: only evaluation.*, threads and a fresh draw's method."
                             f"n_per_class / guidance_scale / sample_steps / sample_eta may be set, got {bad}")
        if "evaluation.parallel=false" not in [s.replace(" ", "") for s in r["set"]]:
            raise SystemExit(f"{path}: rescore {name}: set evaluation.parallel=false (one core per re-score)")
    return out


def source_row(rescore: dict[str, Any]) -> dict[str, Any]:
    """The source configuration's current row in runs.json (not superseded, at ``spec_hash`` when given), with
    ``counted_runs``: the run folders of exactly the draws its figure is the mean of (completed, not superseded,
    private unless the configuration is a non-private reference), so that a re-score averages the same draws."""
    doc = json.loads(RESULTS_JSON.read_text())
    rows = [r for r in doc["rows"]
            if r["config"] == rescore["of"] and not r["superseded"]
            and (not rescore.get("spec_hash") or r["spec_hash"] == rescore["spec_hash"])]
    if len(rows) != 1:
        raise SystemExit(f"{rescore['of']}: {len(rows)} current rows in runs.json; name one with spec_hash")
    row = dict(rows[0])
    configs = load_configs()
    row["counted_runs"] = [d["run_dir"] for d in doc["draws"]
                           if d["config"] == row["config"] and d.get("spec_hash") == row["spec_hash"]
                           and d["status"] == "completed" and not superseded_by(d, configs)
                           and (row["reference"] or not d["not_private"])]
    if len(row["counted_runs"]) != row["draws"]:
        raise SystemExit(f"{row['config']}: {len(row['counted_runs'])} counted draws found, the row has {row['draws']}")
    return row


def read_evaluate_run(run_dir: Path) -> dict[str, Any]:
    """What a re-score records from its evaluate run folder."""
    status = json.loads((run_dir / "status.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    source = json.loads((run_dir / "artifacts" / "source.json").read_text()) \
        if (run_dir / "artifacts" / "source.json").exists() else {}
    prov = status.get("provenance") or {}
    return {"run_dir": str(run_dir), "status": status.get("status"), "commit": prov.get("commit"),
            "dirty": prov.get("dirty"), "versions": prov.get("versions"), "seconds": status.get("seconds"),
            "test_acc_mean": metrics.get("acc_mean"), "test_acc_std": metrics.get("acc_std"),
            "val_acc_mean": metrics.get("val_acc_mean"), "val_acc_std": metrics.get("val_acc_std"),
            "release_sha256": (source.get("sha256") or "")[:16], "source_epsilon": source.get("epsilon"),
            # A fresh draw from a synthesize run's generator: which generator, with which sampling options.
            "generator_sha256": (source.get("generator_sha256") or "")[:16] or None,
            "generated": source.get("generated")}


def _doc() -> dict[str, Any]:
    return json.loads(RESCORE_JSON.read_text()) if RESCORE_JSON.exists() else {"format": 1, "records": []}


@contextlib.contextmanager
def _locked():
    """rescore.json under an exclusive lock (two re-scores may finish at once); written atomically."""
    with open(RESCORE_JSON.with_name(RESCORE_JSON.name + ".lock"), "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            doc = _doc()
            yield doc
            tmp = RESCORE_JSON.with_name(f".{RESCORE_JSON.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, RESCORE_JSON)
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def add_record(name: str, source_run: str, run_dir: Path, command: str) -> dict[str, Any]:
    rec = {"rescore": name, "source_run": source_run, "command": command, **read_evaluate_run(run_dir)}
    with _locked() as doc:
        doc["records"] = [r for r in doc["records"] if r["run_dir"] != rec["run_dir"]] + [rec]
    return rec


def cmd_run(args: argparse.Namespace) -> int:
    rescores = load_rescores()
    r = rescores[args.name]
    row = source_row(r)
    done = {x["source_run"] for x in _doc()["records"] if x["rescore"] == args.name and x["status"] == "completed"}
    deadline = datetime.strptime(args.deadline, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC) if args.deadline else None
    # The code the re-scores run: the working tree, or (--snapshot) one commit's, as bench_runs draws do (one
    # torch thread, one evaluation worker; a snapshot's provenance names its commit).
    source = Source(args.snapshot, args.runs_dir)
    source.versions()  # refuses a snapshot whose runs would import another dpdistill
    env = source.env
    out_dir = args.runs_dir / "rescore" / args.name
    todo = [(i, run) for i, run in enumerate(row["counted_runs"]) if run not in done]
    minutes = r.get("expected_minutes") or 0
    if deadline is not None and todo and time.time() + 60 * minutes > deadline.timestamp():
        print(f"{args.name}: not starting: expected {minutes} min would pass the deadline")
        return 0
    sets = [a for s in r["set"] for a in ("--set", s)]

    def rescore(item: tuple[int, str]) -> bool:
        index, source_run = item
        # One runs folder (and so one sqlite MLflow store) per source draw: concurrent re-scores never share one.
        runs = out_dir / f"draw{index}"
        runs.mkdir(parents=True, exist_ok=True)
        cmd = ["nice", "-n", "10", str(VENV_BIN / "dpdistill"), "evaluate", source_run, *sets,
               "--runs-dir", str(runs), "--no-progress"]
        print(f"{args.name}: re-scoring {source_run}", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=source.root, capture_output=True, text=True)
        found = re.findall(r"^run folder: (.+)$", proc.stdout, flags=re.M)
        if proc.returncode != 0 or not found:
            print(f"{args.name}: failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-400:]}")
            return False
        rec = add_record(args.name, source_run, Path(found[-1].strip()), " ".join(cmd[3:]))
        print(f"{args.name}: {rec['status']}, test {100 * rec['test_acc_mean']:.2f} % ({source_run})", flush=True)
        return True

    # --jobs re-scores at once, one thread each (each evaluate keeps to one core).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        ok = all(list(pool.map(rescore, todo)))
    render()
    return 0 if ok else 1


def cmd_record(args: argparse.Namespace) -> int:
    """Record an evaluate run folder made by hand with the rescore's command."""
    load_rescores()[args.name]  # noqa: B018 - it must exist
    run_dir = Path(args.evaluate_run).resolve()
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    if spec.get("kind") != "evaluate" or Path(spec["method"]["run"]) != Path(args.source_run).resolve():
        raise SystemExit(f"{run_dir}: not an evaluate run of {args.source_run}")
    rec = add_record(args.name, str(Path(args.source_run).resolve()), run_dir, "(recorded from an existing run)")
    print(f"recorded {run_dir}: {rec['status']}")
    render()
    return 0


def _pct(values: list[float], one_std: float | None = None) -> str:
    """Mean ± std (ddof 1) in %, as runs.md shows them; one value: ± ``one_std`` (its evaluation seeds')."""
    mean, std = _mean_std(values)
    return bench_runs_pct(mean, std if len(values) > 1 else one_std)


def render() -> None:
    rescores = load_rescores()
    records = _doc()["records"]
    lines = ["# rescore: recorded releases re-scored under another evaluation protocol (`dpdistill evaluate`)", "",
             "Rendered from `rescore.json` by `benchmarks/bench_rescore.py`. Each row re-scores the releases of a",
             "runs.md row (the same released images, nothing charged) under the protocol its overrides name; test",
             "(and validation) accuracy are mean ± std over the source's noise draws (a one-draw reference: ± over",
             "its evaluation seeds), the source row's own figure beside them.", "",
             "| rescore | of | protocol overrides | draws | test % | val % | source test % | release ε | commit "
             "| seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, r in rescores.items():
        row = source_row(r)
        recs = [x for x in records if x["rescore"] == name and x["status"] == "completed"
                and x["source_run"] in row["counted_runs"]]
        if not recs:
            continue
        # As runs.md: a one-draw reference row's ± is its evaluation seeds' spread; a one-draw private row has none.
        one = recs[0] if len(recs) == 1 and row["reference"] else {}
        test = _pct([x["test_acc_mean"] for x in recs], one.get("test_acc_std"))
        val = _pct([x["val_acc_mean"] for x in recs if x.get("val_acc_mean") is not None], one.get("val_acc_std"))
        src = _pct(row["test_acc_by_draw"], row["test_acc_std"] if row["draws"] == 1 else None)
        commits = ", ".join(sorted({(x["commit"] or "?")[:10] + ("+dirty" if x.get("dirty") else "") for x in recs}))
        seconds = statistics.fmean(float(x["seconds"] or 0) for x in recs)
        overrides = ", ".join(f"`{s}`" for s in r["set"] if s.replace(" ", "") != "evaluation.parallel=false")
        eps = [x["source_epsilon"] for x in recs if x.get("source_epsilon") is not None]
        privacy = f"{max(eps):.3f}" if eps else "none (NOT PRIVATE reference)" if row["reference"] else "?"
        lines.append(f"| `{name}` | `{r['of']}` | {overrides} | {len(recs)}/{row['draws']} | {test} | {val} | "
                     f"{src} | {privacy} | {commits} | {seconds:.0f} |")
        sets = " ".join(f"--set '{s}'" for s in r["set"])
        versions = recs[-1].get("versions") or {}
        notes.append(f"- `{name}`: `dpdistill evaluate RUN_DIR {sets}` for each run folder of `{r['of']}`'s row. "
                     f"{r['description'].strip()} Chosen by: {r['chosen_by'].strip()} Versions: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
    lines += ["", "Rescores (what each measures):", ""] + notes + [""]
    RESCORE_MD.write_text("\n".join(lines))
    print(f"wrote {RESCORE_MD}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="re-score every draw of the source row not yet re-scored")
    r.add_argument("name")
    r.add_argument("--deadline", help="UTC, e.g. 2026-12-05T01:30Z: start no re-score that would pass it")
    r.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    r.add_argument("--jobs", type=int, default=1, help="re-scores at once (one core each)")
    r.add_argument("--snapshot", metavar="REV", help="run the code of this commit, not the working tree")
    rec = sub.add_parser("record", help="record an evaluate run folder made by hand")
    rec.add_argument("name")
    rec.add_argument("source_run")
    rec.add_argument("evaluate_run")
    sub.add_parser("render", help="rewrite results/rescore.md from rescore.json")
    args = p.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "record":
        return cmd_record(args)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
