"""Benchmark: LiRA membership inference on the shipped release pipelines (issue 25), through `dpdistill mia`.

Each named study below is one `dpdistill mia <job spec> --shadows S --pool P --set ...` (a checked-in spec plus
overrides, the product path): S shadow runs of the whole pipeline, each on a random half of a pool of P MNIST
training records, a model trained on each release with the job's evaluation protocol, TPR at 0.1 % and 1 % FPR
and the AUC over every (shadow, record) trial. A study's folder goes under --runs-dir (outside the repository:
it holds figures computed from sensitive records without noise, stamped NOT PRIVATE); what is recorded here is
the figures, the command, the commit and the package versions, in results/mia.json and results/mia.md (one row
per study run; a rerun of a study adds a row).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mia.py --only ndpdc-mnist-eps1 \\
        --runs-dir /tmp/mia-runs

Settings are fixed before any study ran (no choice was made from their figures): pool 500 (250 members per
shadow on average, so 16 shadows give ~4,000 non-member trials, enough to read a 0.1 % FPR), 16 shadows.

A study longer than a session (DP-GenG at ε=10: ~5 h on 2 cores) is finished in parts: `dpdistill mia` saves
every shadow as it finishes, and a later run of this script with the same --runs-dir resumes the study's
unfinished folder (`dpdistill mia --resume`) instead of starting over; the recorded seconds are the sum over
its attempts (as far as each got), and the row says how many attempts it took and which commits they ran
(each attempt stamps its own). To keep a multi-session study on one commit while the checkout moves on, run it
from a snapshot: `PYTHONPATH=<bench_runs' src/<sha>>/platform DPDISTILL_SOURCE_COMMIT=<sha>` (bench_runs.py
--snapshot exports one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DPDISTILL = Path(sys.executable).parent / "dpdistill"

# name -> (job spec, overrides, shadows, pool, expected minutes on 2 cores)
STUDIES: dict[str, dict] = {
    "dm-mnist-200it": {
        "spec": "jobs/dm-mnist.yaml",
        # compile / real_precision pinned to what the study ran before the job shipped them (same spec)
        "set": ["compile=false", "method.real_precision=float32", "method.iterations=200"],
        "shadows": 16, "pool": 500, "minutes": 30,
        "why": "the non-private reference at NDPDC's 200-iteration schedule (the shipped 2,000 would take ~2 h)"},
    "ndpdc-mnist-eps1": {
        "spec": "jobs/ndpdc-mnist.yaml", "set": ["privacy.epsilon=1"], "shadows": 16, "pool": 500, "minutes": 15,
        "why": "NDPDC as in runs.md's ndpdc-mnist-eps1 (rows before 551a0b7 ran the job's earlier image step, "
               "lr_img 100)"},
    "ndpdc-mnist-eps10": {
        "spec": "jobs/ndpdc-mnist.yaml", "set": [], "shadows": 16, "pool": 500, "minutes": 15,
        "why": "NDPDC as shipped (ε=10; rows before 551a0b7 ran the job's earlier image step, lr_img 100)"},
    "dpgeng-mnist-eps1": {
        "spec": "jobs/dpgeng-mnist.yaml",
        "set": ["compile=false", "method.generator=dp-merf", "method.public=null", "method.generated_per_class=500",
                "method.extractor_epochs=3"],
        "shadows": 16, "pool": 500, "minutes": 70,
        "why": "DP-GenG at ε=1 with the DP-MERF generator (the job as shipped until it took DP-MEPF); goal TPR @ "
               "0.1 % FPR <= 0.2 %. At a shadow's ~25 records a class matching 'auto' plans a per-iteration "
               "noise ratio of ~114 (250 MNIST records, ε=1) and so runs no feature matching, giving its share "
               "to the generator: the row at 929ccad measures that pipeline. The earlier row at f2c320c ran "
               "'auto' as it was then (one decoupled release a class)"},
    "dpgeng-mnist-eps10": {
        "spec": "jobs/dpgeng-mnist.yaml",
        "set": ["compile=false", "method.generator=dp-merf", "method.public=null", "method.generated_per_class=500",
                "method.extractor_epochs=3", "privacy.epsilon=10",
                "method.expert_guidance=false", "method.iterations=4000",
                "method.generator_options={iterations: 3000, num_features: 5000}"],
        "shadows": 16, "pool": 500, "minutes": 300,
        "why": "DP-GenG at ε=10 with runs.md's overrides (at a shadow's ~25 records a class matching 'auto' runs "
               "no matching: ratio ~67)"},
    "dm-digits-smoke": {
        "spec": "jobs/dm-digits.yaml", "set": ["method.iterations=20", "method.ipc=2", "evaluation.epochs=20"],
        "shadows": 4, "pool": 200, "minutes": 3, "why": "a smoke test of this script (digits, tiny): not a figure"},
}
PACKAGES = ("dpdistill", "torch", "opacus", "ray", "numpy")


def unfinished_study(name: str, runs_dir: Path) -> Path | None:
    """The newest folder of study ``name`` under ``runs_dir`` that did not complete and holds the same spec,
    shadow count and pool (so resuming it finishes this study, not another)."""
    from dpdistill.errors import SpecError
    from dpdistill.spec import load_spec

    s = STUDIES[name]
    want = load_spec(ROOT / s["spec"], s["set"]).to_yaml()
    for folder in sorted((runs_dir / name).glob("*-mia/*"), reverse=True):
        try:
            status = json.loads((folder / "status.json").read_text())["status"]
            state = json.loads((folder / "study.json").read_text())
            # Both sides resolved under today's code: a field the schema gained since the study started
            # resolves to its default on both, so it does not orphan the study (a changed value still does).
            same = (load_spec(folder / "spec.yaml").to_yaml() == want and state["shadows"] == s["shadows"]
                    and state["pool"] == s["pool"])
        except (OSError, ValueError, KeyError, SpecError):
            continue
        if status != "completed" and same:
            return folder
    return None


def run_study(name: str, runs_dir: Path) -> dict:
    """One `dpdistill mia` of study ``name`` (or the resumption of its unfinished folder); returns its recorded
    row (raises when the study failed)."""
    s = STUDIES[name]
    out_dir = runs_dir / name
    sets = [a for v in s["set"] for a in ("--set", v)]
    shown = " ".join(["dpdistill", "mia", s["spec"], "--shadows", str(s["shadows"]), "--pool", str(s["pool"]),
                      *[f"--set '{v}'" for v in s["set"]]])
    resume = unfinished_study(name, runs_dir)
    if resume is not None:
        cmd = [str(DPDISTILL), "mia", "--resume", str(resume)]
        print(f"{name}: resuming {resume}", flush=True)
    else:
        cmd = [str(DPDISTILL), "mia", s["spec"], "--shadows", str(s["shadows"]), "--pool", str(s["pool"]), *sets,
               "--runs-dir", str(out_dir)]
    before = set(out_dir.glob("*-mia/*")) if out_dir.exists() else set()
    start = datetime.now(UTC)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: dpdistill mia exited {proc.returncode}: {proc.stderr[-2000:]}")
    (folder,) = [resume] if resume is not None else set(out_dir.glob("*-mia/*")) - before
    mia = json.loads((folder / "mia.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    attempts = json.loads((folder / "study.json").read_text())["attempts"]
    first = attempts[0]["started"]
    # The code each attempt ran (stamped by `dpdistill mia`; a snapshot run names it by DPDISTILL_SOURCE_COMMIT),
    # not this checkout's HEAD, which may have moved on while a study ran in parts.
    ran = sorted({str(a.get("commit") or "unknown")[:10] + ("+dirty" if a.get("dirty") else "") for a in attempts})
    return {
        "study": name, "command": shown, "why": s["why"],
        "started": datetime.fromisoformat(first).strftime("%Y-%m-%dT%H:%MZ") if resume else
        start.strftime("%Y-%m-%dT%H:%MZ"),
        "epsilon": mia.get("epsilon"), "method": mia.get("method"), "shadows": s["shadows"], "pool": s["pool"],
        "tpr_at_0.1%fpr": metrics["mia_tpr_at_0.1%fpr"], "tpr_at_1%fpr": metrics["mia_tpr_at_1%fpr"],
        "auc": metrics["mia_auc"], "members": mia.get("members"), "non_members": mia.get("non_members"),
        "variance": mia.get("variance"), "wall_s": round(float(mia["seconds"]), 1), "attempts": mia["attempts"],
        "run_dir": str(folder), "machine": machine(),
        "commit": ", ".join(ran),
        "versions": {p: metadata.version(p) for p in PACKAGES},
    }


def render(doc: dict) -> Path:
    """results/mia.md from results/mia.json."""
    m = doc["machine"]
    lines = ["# mia: LiRA membership inference through `dpdistill mia`", "",
             "Rendered from `mia.json` by `benchmarks/bench_mia.py`. TPR at a fixed FPR over every (shadow, record)",
             "trial of the study (online LiRA, leave-one-out over shadows; a 0.1 % FPR reads the top ~0.1 % of the",
             "non-member trials, so a study with few non-member trials reads it coarsely). NOT PRIVATE: the study",
             "folders (outside the repository) hold figures computed from sensitive records without noise.", "",
             f"latest machine: {m['cpu']}, {m['cores']} cores, {m['memory']} (each row names its own CPU). wall s: the",
             "study's own seconds, summed over its attempts when it was finished in parts.", ""]
    header = ["| study | method | ε | shadows / pool | TPR @ 0.1 % FPR | TPR @ 1 % FPR | AUC | trials (in / out) "
              "| wall s | CPU | commit | command |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += header
    def row(r: dict) -> str:
        eps = "none" if r["epsilon"] is None else f"{r['epsilon']:g}"
        return (f"| `{r['study']}` | {r['method']} | {eps} | {r['shadows']} / {r['pool']}"
                f" | {100 * r['tpr_at_0.1%fpr']:.2f} % | {100 * r['tpr_at_1%fpr']:.2f} % | {r['auc']:.3f}"
                f" | {r['members']} / {r['non_members']} | {r['wall_s']:.0f}"
                f"{' (' + str(r['attempts']) + ' attempts)' if r.get('attempts', 1) > 1 else ''}"
                f" | {(r.get('machine') or {}).get('cpu', 'not recorded')} | {r['commit']}"
                f" | `{r['command']}` |")

    # A study recorded again (e.g. after the pipeline it measures changed) shows its newest row; the earlier
    # ones stay in mia.json and are listed apart.
    latest = {r["study"]: i for i, r in enumerate(doc["rows"])}
    lines += [row(r) for i, r in enumerate(doc["rows"]) if latest[r["study"]] == i]
    earlier = [r for i, r in enumerate(doc["rows"]) if latest[r["study"]] != i]
    if earlier:
        lines += ["", "Earlier rows of a study recorded again (the row above replaces them; they measured the code "
                  "their commit names):", "", *header] + [row(r) for r in earlier]
    lines += ["", "Studies (why each is set up as it is):", ""]
    lines += [f"- `{n}`: {s['why']}" for n, s in STUDIES.items()]
    path = RESULTS / "mia.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", required=True, help="comma-separated study names: " + ", ".join(STUDIES))
    ap.add_argument("--runs-dir", type=Path, required=True, help="where the study folders go (not the repo)")
    ap.add_argument("--record", action="store_true", help="append the rows to results/mia.json (smoke: no)")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"unknown studies: {', '.join(unknown)} (known: {', '.join(STUDIES)})", file=sys.stderr)
        return 2
    if ROOT in args.runs_dir.resolve().parents or args.runs_dir.resolve() == ROOT:
        print("--runs-dir: must be outside the repository (study folders hold unnoised figures)", file=sys.stderr)
        return 2
    path = RESULTS / "mia.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc["machine"] = machine()
    for name in names:
        row = run_study(name, args.runs_dir)
        print(json.dumps(row, indent=1), flush=True)
        if args.record and not name.endswith("-smoke"):
            doc["rows"].append(row)
            path.write_text(json.dumps(doc, indent=2) + "\n")
            render(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
