"""Benchmark named configurations through the product path: each noise draw is one `dpdistill run` of a job spec.

A configuration (benchmarks/configs.yaml) is a checked-in job spec plus `--set` overrides and a number of draws.
Each draw runs ``.venv/bin/dpdistill run SPEC --set ... --runs-dir DIR`` as a subprocess, under ``nice -n 10``
with one torch thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1), so it is a real run folder and MLflow run with its
resolved spec and ledger. The privacy noise is secret, so every run is a fresh noise draw; spec.seed stays as the
configuration says. A configuration's figure is the mean ± std (ddof 1) over its draws of the run's test
(and validation) accuracy, itself the mean over the job's evaluation seeds.

Results are one append-only list of draws in results/runs.json (each with its run folder, accuracies, ledger
ε/δ, wall time, not_private flag, spec hash, git commit + dirty flag, package versions), from which the rows
(one per configuration and spec hash) and results/runs.md are derived. Every finished draw is recorded as it
completes, under a file lock, so a configuration can be run one draw at a time, by several processes at once,
and across sessions; a draw in progress is "claimed" in the file so that two processes never overshoot a
configuration's draws.

    .venv/bin/python benchmarks/bench_runs.py check                      # validate every configuration; name
                                                                         # those whose row has another spec
    .venv/bin/python benchmarks/bench_runs.py run dpgeng-mnist-eps1      # run it until it has its draws
    .venv/bin/python benchmarks/bench_runs.py run ndpdc-mnist-eps1 --draws 1   # one more draw, now
    .venv/bin/python benchmarks/bench_runs.py run A B --snapshot HEAD --deadline 2026-12-02T19:00Z
    .venv/bin/python benchmarks/bench_runs.py record CONFIG RUN_DIR      # add a run folder made by hand
    .venv/bin/python benchmarks/bench_runs.py merge other/runs.json      # merge draws measured elsewhere
    .venv/bin/python benchmarks/bench_runs.py render                     # rewrite runs.json rows + runs.md

``--snapshot REV`` runs the code of a commit (``git archive`` of platform/, jobs/ and pyproject.toml into
DIR/src/<sha>, put first on PYTHONPATH), so that edits in the working tree made while a long run is going do
not leak into it; without it the working tree runs and the draw records whether it was dirty.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
CONFIGS = BENCH / "configs.yaml"
RESULTS_JSON = BENCH / "results" / "runs.json"
DEFAULT_RUNS_DIR = Path("/work/bench_runs")
VENV_BIN = REPO / ".venv" / "bin"
FORMAT = 1

# Distributions whose versions every draw records (the interpreter's own version is recorded too).
PACKAGES = ("torch", "torchvision", "opacus", "dp-accounting", "ray", "mlflow", "numpy")
# Resolved-spec fields that say where a run ran, not what it computed: left out of the spec hash.
PER_RUN_FIELDS = (("tracking",), ("ray", "address"), ("ray", "auth_token_path"), ("data", "root"),
                  ("data", "download"))
# Fields added after rows were recorded, left out of the hash at the value that reproduces the old behaviour
# (so those rows keep their hashes); any other value is part of the configuration and stays in.
LATER_FIELD_DEFAULTS = ((("compile",), False),
                        # a diffusion synthesiser's pretrain_seed: None pre-trains with its own seed, as before
                        (("method", "pretrain_seed"), None),
                        # the same for DP-GenG's diffusion generator (its job sets 0 since the 6,000-step base)
                        (("method", "generator_options", "pretrain_seed"), None),
                        # a diffusion synthesiser's ema_decay: 0 releases the last DP-SGD iterate, as before
                        (("method", "ema_decay"), 0.0),
                        (("method", "generator_options", "ema_decay"), 0.0))
# Code that seeded private noise from spec.seed before issue 19's fix (Synthesizer.noise_generator, opacus'
# noise_generator fed a seeded torch.Generator, DP-GenG's feature-matching generator); a draw records any hit.
SEEDED_NOISE_PATTERN = r"noise_generator\(|noise_generator=torch\.Generator|manual_seed\(base_seed \+ 6\)"
# The knobs that keep a run on one core: in-process evaluation, or a one-CPU Ray cluster.
ONE_CORE_OVERRIDES = ("evaluation.parallel=false", "ray.num_cpus=1")


def _say(what: str) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"[{datetime.now(UTC):%H:%M:%S}Z] {what} (load {load:.1f})", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------- configurations


def load_configs(path: Path = CONFIGS) -> dict[str, dict[str, Any]]:
    """The named configurations, each checked for the fields bench_runs needs."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    configs = doc.get("configs") or {}
    for name, c in configs.items():
        missing = [k for k in ("spec", "draws", "description", "chosen_by") if k not in c]
        if missing:
            raise SystemExit(f"{path}: configuration {name}: missing {', '.join(missing)}")
        c.setdefault("set", [])
        c.setdefault("expected_minutes", None)
        superseded = c.setdefault("superseded", [])
        if not isinstance(superseded, list) or any(
                not isinstance(e, dict) or not e.get("commits") or not e.get("reason") for e in superseded):
            raise SystemExit(f"{path}: configuration {name}: superseded must be a list of {{commits: [...], "
                             "reason: ...}}")
        if not any(s.replace(" ", "") in ONE_CORE_OVERRIDES for s in c["set"]):
            raise SystemExit(f"{path}: configuration {name}: set one of {', '.join(ONE_CORE_OVERRIDES)} "
                             "(otherwise the evaluation's Ray cluster takes every core)")
    return configs


def _parent(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The dict holding ``path``'s last key in ``doc`` (None when a step is missing or not a dict)."""
    node: Any = doc
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def spec_hash(resolved: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of a resolved spec without the fields that only say where it ran."""
    doc = json.loads(json.dumps(resolved))
    for path in PER_RUN_FIELDS:
        node = _parent(doc, path)
        if node is not None:
            node.pop(path[-1], None)
    for path, default in LATER_FIELD_DEFAULTS:
        node = _parent(doc, path)
        if node is not None and path[-1] in node and node[path[-1]] == default:
            del node[path[-1]]
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- source of the code


class Source:
    """The code a draw runs: the working tree, or a snapshot of one commit (``git archive``)."""

    def __init__(self, snapshot: str | None, runs_dir: Path):
        self.commit = _git("rev-parse", snapshot or "HEAD")
        if snapshot:
            self.root = runs_dir / "src" / self.commit
            if not (self.root / "platform" / "dpdistill").is_dir():
                tmp = self.root.with_name(self.root.name + f".tmp{os.getpid()}")
                tmp.mkdir(parents=True, exist_ok=True)
                archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", self.commit,
                                          "platform", "jobs", "pyproject.toml"], check=True, capture_output=True)
                subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
                with contextlib.suppress(OSError):  # another process may have made it meanwhile
                    tmp.rename(self.root)
            self.label = f"snapshot of {self.commit[:10]} at {self.root}"
            self.dirty_paths: list[str] = []
        else:
            self.root = REPO
            self.label = "working tree"
            # Only what a run executes or reads counts (benchmarks/ and docs do not change a figure).
            status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "platform", "jobs",
                                     "pyproject.toml"], check=True, capture_output=True, text=True).stdout
            self.dirty_paths = [line[3:] for line in status.splitlines() if line.strip()]  # "XY path"
        # DPDISTILL_EVAL_WORKERS=1: an in-process evaluation would otherwise train its seeds in one worker
        # process per free core (evaluation/workers.py), and a draw must keep to its one core.
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                        PYTHONUNBUFFERED="1", DPDISTILL_EVAL_WORKERS="1")
        self.env.pop("DPDISTILL_SOURCE_COMMIT", None)  # set below for a snapshot only
        self.env.setdefault("DPDISTILL_DATA", str(REPO.parent / "shared" / "data"))
        if snapshot:
            # An exported snapshot is no git checkout: name its commit for the run folder's provenance.
            self.env["DPDISTILL_SOURCE_COMMIT"] = self.commit
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(self.root / "platform")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._versions: dict[str, Any] | None = None

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_paths)

    def python(self, code: str, *args: str) -> str:
        """Run ``code`` with the venv's interpreter and this source's code; returns stdout."""
        out = subprocess.run([str(VENV_BIN / "python"), "-c", code, *args], env=self.env, cwd=self.root,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{self.label}: {out.stderr.strip().splitlines()[-1] if out.stderr else out}")
        return out.stdout

    def versions(self) -> dict[str, Any]:
        """Package versions and the dpdistill module the runs import (checked to be this source's)."""
        if self._versions is None:
            code = ("import importlib.metadata as m, json, platform, sys\n"
                    "import dpdistill\n"
                    "v = {}\n"
                    f"for p in {PACKAGES!r}:\n"
                    "    try: v[p] = m.version(p)\n"
                    "    except m.PackageNotFoundError: v[p] = None\n"
                    "v['python'] = platform.python_version()\n"
                    "v['dpdistill_path'] = dpdistill.__file__\n"
                    "print(json.dumps(v))\n")
            self._versions = json.loads(self.python(code))
            want = (self.root / "platform" / "dpdistill").resolve()
            if Path(self._versions["dpdistill_path"]).resolve().parent != want:
                raise SystemExit(f"{self.label}: runs would import dpdistill from "
                                 f"{self._versions['dpdistill_path']}, not from {want}")
        return self._versions

    def resolve(self, config: dict[str, Any]) -> dict[str, Any]:
        """The resolved spec (load_spec of this source's code) of a configuration, without running it."""
        code = ("import sys, json\nfrom dpdistill.spec import load_spec\n"
                "print(json.dumps(load_spec(sys.argv[1], sys.argv[2:]).model_dump(mode='json')))\n")
        return json.loads(self.python(code, config["spec"], *config["set"]))

    def seeded_noise_hits(self) -> list[str]:
        """Lines of the source's package that still seed privacy noise from the spec's seed (issue 19)."""
        out = subprocess.run(["grep", "-rnE", SEEDED_NOISE_PATTERN, "platform", "--include=*.py"],
                             cwd=self.root, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if line.strip()]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


# ------------------------------------------------------------------------------------------- the results file


@contextlib.contextmanager
def locked_results(path: Path):
    """Read-modify-write the results file under an exclusive lock; written atomically on leaving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            doc = json.loads(path.read_text()) if path.exists() else {}
            doc.setdefault("format", FORMAT)
            doc.setdefault("draws", [])
            doc.setdefault("failed", [])
            doc.setdefault("claims", [])
            yield doc
            doc["rows"] = aggregate(doc["draws"], load_configs())
            doc["updated"] = _now()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
            render_md(doc, path.with_suffix(".md"))
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def _alive(claim: dict[str, Any]) -> bool:
    """Whether the process that claimed a draw still runs (a claim of a dead process is stale)."""
    if claim.get("host") != socket.gethostname():
        return True  # cannot tell; another machine's claim stands until merged away
    try:
        cmdline = Path(f"/proc/{claim['pid']}/cmdline").read_bytes()
    except OSError:
        return False
    return b"bench_runs" in cmdline


def _counted(draw: dict[str, Any], name: str, commit: str, reference: bool = False) -> bool:
    """Whether ``draw`` counts towards ``name``'s draws at ``commit``: completed, and private unless the
    configuration is a non-private reference (whose every run is NOT PRIVATE by design)."""
    return draw["config"] == name and draw["commit"] == commit and draw["status"] == "completed" \
        and (reference or not draw["not_private"])


def claim_draw(path: Path, name: str, commit: str, target: int | None, reference: bool = False) -> str | None:
    """Claim the next draw of ``name`` at ``commit`` (None when it has ``target`` draws done or in progress;
    ``reference``: a non-private reference configuration, whose NOT PRIVATE runs count)."""
    with locked_results(path) as doc:
        doc["claims"] = [c for c in doc["claims"] if _alive(c)]
        if target is not None:
            done = sum(_counted(d, name, commit, reference) for d in doc["draws"])
            running = sum(c["config"] == name and c["commit"] == commit for c in doc["claims"])
            if done + running >= target:
                return None
        claim_id = uuid.uuid4().hex[:12]
        doc["claims"].append({"id": claim_id, "config": name, "commit": commit, "pid": os.getpid(),
                              "host": socket.gethostname(), "started": _now()})
    return claim_id


def finish_draw(path: Path, claim_id: str | None, record: dict[str, Any]) -> bool:
    """Append a finished (or failed) draw and drop its claim; False when its run folder was recorded already."""
    with locked_results(path) as doc:
        doc["claims"] = [c for c in doc["claims"] if c["id"] != claim_id]
        key = "draws" if record["status"] == "completed" else "failed"
        if any(d.get("run_dir") == record.get("run_dir") and record.get("run_dir")
               for d in doc["draws"] + doc["failed"]):
            _say(f"{record['run_dir']} is recorded already; not recorded twice")
            return False
        doc[key].append(record)
    return True


def release_claim(path: Path, claim_id: str) -> None:
    with locked_results(path) as doc:
        doc["claims"] = [c for c in doc["claims"] if c["id"] != claim_id]


# ------------------------------------------------------------------------------------------- one draw


def read_run_folder(run_dir: Path) -> dict[str, Any]:
    """What a draw records from its run folder: status, accuracies, ledger (ε, δ), NOT PRIVATE flags, spec hash."""
    status = json.loads((run_dir / "status.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    ledger = json.loads((run_dir / "ledger.json").read_text()) if (run_dir / "ledger.json").exists() else None
    resolved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    noise = ledger.get("noise") if ledger else None
    not_private = bool(metrics.get("not_private")) or bool(status.get("not_private")) \
        or (ledger is not None and noise != "secret") or (resolved.get("privacy") or {}).get("reproducible_noise")
    out = {
        "run_dir": str(run_dir),
        "status": status.get("status"),
        "mlflow_run_id": status.get("mlflow_run_id"),
        "spec_hash": spec_hash(resolved),
        "test_acc_mean": metrics.get("acc_mean"),
        "test_acc_std": metrics.get("acc_std"),
        "val_acc_mean": metrics.get("val_acc_mean"),
        "val_acc_std": metrics.get("val_acc_std"),
        "ledger_epsilon": ledger["composed"]["epsilon"] if ledger else None,
        "ledger_delta": ledger["composed"]["delta"] if ledger else None,
        "epsilon_budget": ledger.get("epsilon_budget") if ledger else None,
        "noise": noise,
        "not_private": bool(not_private),
        "run_wall_s": metrics.get("wall_seconds"),
    }
    # Two draws of one configuration must release different sets (fresh secret noise): the hash shows it.
    for released in ("distilled.pt", "synthetic.npz"):
        if (run_dir / "artifacts" / released).is_file():
            out["release_sha256"] = hashlib.sha256((run_dir / "artifacts" / released).read_bytes()).hexdigest()[:16]
            break
    # The method's extra figures that a reader compares against (DP-GenG's DP-generated baseline, fidelity).
    for k in ("baseline_generated_acc_mean", "baseline_generated_acc_std", "baseline_generated_val_acc_mean",
              "fid", "fid_domain"):
        if k in metrics:
            out[k] = metrics[k]
    # `evaluation.models: [...]`: one test (and validation) accuracy per architecture (acc_mean_<model>).
    by_model = {k.removeprefix("acc_mean_"): {"test": v, "val": metrics.get("val_acc_mean_" + k[9:])}
                for k, v in metrics.items() if k.startswith("acc_mean_")}
    if by_model:
        out["acc_by_model"] = by_model
    return out


def run_draw(name: str, config: dict[str, Any], source: Source, runs_dir: Path, claim_id: str | None,
             results: Path) -> dict[str, Any]:
    """One `dpdistill run` of a configuration; returns the recorded draw (completed or failed)."""
    config_runs = runs_dir / name
    config_runs.mkdir(parents=True, exist_ok=True)
    logs = runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sets = [a for s in config["set"] for a in ("--set", s)]
    # The run's working directory is its configuration's runs folder: MLflow's default artifact root
    # (./mlruns beside a sqlite store) then lands there too, never in the repository.
    cmd = ["nice", "-n", "10", str(VENV_BIN / "dpdistill"), "run", str(source.root / config["spec"]), *sets,
           "--runs-dir", str(config_runs), "--no-progress"]
    versions = source.versions()
    hits = source.seeded_noise_hits()
    log_path = logs / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{claim_id or 'adhoc'}.log"
    _say(f"{name}: starting a draw ({source.label}); output in {log_path}")
    load_before = os.getloadavg()[0]
    started, t0 = _now(), time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=config_runs, env=source.env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    run_dir = _run_folder_in(text) or _newest_run(config_runs, started)
    record: dict[str, Any] = {
        "config": name, "draw_id": claim_id or uuid.uuid4().hex[:12], "spec": config["spec"],
        "set": list(config["set"]), "command": " ".join(cmd), "started": started, "ended": _now(),
        "wall_s": round(wall, 1), "returncode": proc.returncode, "commit": source.commit,
        "dirty": source.dirty, "dirty_paths": source.dirty_paths, "source": source.label,
        "versions": versions, "seeded_noise_code": hits, "threads": 1, "nice": 10,
        "host": socket.gethostname(), "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2), "log": str(log_path),
    }
    if run_dir is not None and (run_dir / "status.json").exists():
        record.update(read_run_folder(run_dir))
    else:
        record.update(run_dir=None, status="failed", not_private=False)
    if proc.returncode != 0:
        record["status"] = "failed"
        record["error_tail"] = text.strip().splitlines()[-5:]
    finish_draw(results, claim_id, record)
    acc = record.get("test_acc_mean")
    _say(f"{name}: draw {record['status']} in {wall:.0f} s"
         + (f", test {100 * acc:.2f} %" if isinstance(acc, float) else "") + f" ({record.get('run_dir')})")
    return record


def _run_folder_in(text: str) -> Path | None:
    """The run folder a `dpdistill run` output names: its summary's "run folder:" line, else (a run stopped
    before its summary) the runner's "run <folder> started" line, which a run without a terminal prints as its
    pipeline starts, else (a run that failed before that) its outcome line "run <folder> failed after".
    Not the newest folder on disk: draws of one configuration run side by side."""
    found = (re.findall(r"^run folder: (.+)$", text, flags=re.M)
             or re.findall(r" INFO run (.+) started \(kind=", text)
             or re.findall(r" ERROR run (.+) (?:failed|interrupted) after [0-9.]+ s", text))
    return Path(found[-1].strip()) if found else None


def _newest_run(config_runs: Path, started: str) -> Path | None:
    """The newest run folder under ``config_runs`` made after ``started``: the last resort, when the output names
    none (the CLI died before the runner's first line); wrong when draws of the configuration run side by side."""
    cutoff = datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() - 1
    folders = [p for p in config_runs.glob("*/*") if (p / "status.json").exists() and p.stat().st_mtime >= cutoff]
    return max(folders, key=lambda p: p.name) if folders else None


# ------------------------------------------------------------------------------------------- aggregation


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def superseded_by(draw: dict[str, Any], configs: dict[str, dict[str, Any]]) -> str:
    """Why ``draw`` no longer counts towards its configuration's figure ("" if it does): its commit is listed
    under the configuration's ``superseded`` (code that changed the result under the same spec, e.g. another
    pre-training). Its draws stay in runs.json and are shown apart."""
    for entry in configs.get(draw["config"], {}).get("superseded", []):
        if any(draw["commit"].startswith(str(c)) for c in entry["commits"]):
            return str(entry["reason"])
    return ""


def aggregate(draws: list[dict[str, Any]], configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration, spec hash and supersession: mean ± std (ddof 1) over its private, completed
    draws (superseded draws form rows of their own, marked with the reason)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for d in draws:
        if d["status"] == "completed":
            groups.setdefault((d["config"], d.get("spec_hash") or "?", superseded_by(d, configs)), []).append(d)
    order = {n: i for i, n in enumerate(configs)}
    rows = []
    for (name, shash, gone), ds in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 1e9), kv[0])):
        c = configs.get(name, {})
        # A non-private reference (DM, DC: `reference: true` in configs.yaml) has no noise to draw: its runs are
        # NOT PRIVATE by design and are the row's figure; a one-run row's spread is its evaluation seeds'.
        reference = bool(c.get("reference"))
        private = [d for d in ds if reference or not d["not_private"]]
        test = [d["test_acc_mean"] for d in private if d.get("test_acc_mean") is not None]
        val = [d["val_acc_mean"] for d in private if d.get("val_acc_mean") is not None]
        base = [d["baseline_generated_acc_mean"] for d in private if d.get("baseline_generated_acc_mean") is not None]
        t_mean, t_std = _mean_std(test)
        if reference and len(private) == 1:
            t_std = private[0].get("test_acc_std")
            v_std = private[0].get("val_acc_std")
        v_mean, v_std_draws = _mean_std(val)
        if not (reference and len(private) == 1):
            v_std = v_std_draws
        b_mean, b_std = _mean_std(base)
        base_val = [d["baseline_generated_val_acc_mean"] for d in private
                    if d.get("baseline_generated_val_acc_mean") is not None]
        bv_mean, bv_std = _mean_std(base_val)
        eps = [d["ledger_epsilon"] for d in private if d.get("ledger_epsilon") is not None]
        rows.append({
            "config": name, "spec": ds[0]["spec"], "set": ds[0]["set"], "spec_hash": shash, "superseded": gone,
            # The overrides configs.yaml gives the configuration TODAY: the command that reproduces the row at
            # HEAD. They differ from the draws' own (``set``) when an override was pinned after the job's
            # defaults moved on (e.g. psg-mnist-eps1 after the job shipped 200 iterations).
            "config_set": list(c["set"]) if "set" in c else None,
            "description": c.get("description", ""), "chosen_by": c.get("chosen_by", ""),
            "draws_target": c.get("draws"), "draws": len(private), "draws_not_private": len(ds) - len(private),
            "reference": reference,
            "test_acc_mean": t_mean, "test_acc_std": t_std, "val_acc_mean": v_mean, "val_acc_std": v_std,
            "baseline_generated_acc_mean": b_mean, "baseline_generated_acc_std": b_std,
            # over the draws that recorded it (runs before the baseline was read on validation did not)
            "baseline_generated_val_acc_mean": bv_mean, "baseline_generated_val_acc_std": bv_std,
            "test_acc_by_draw": test, "val_acc_by_draw": val,
            "ledger_epsilon_max": max(eps) if eps else None,
            "ledger_delta": private[0].get("ledger_delta") if private else None,
            "wall_s_mean": statistics.fmean(d["wall_s"] for d in ds),
            "commits": sorted({d["commit"][:10] + ("+dirty" if d["dirty"] else "") for d in ds}),
            "versions": _common_versions(ds),
            "seeded_noise_code": any(d.get("seeded_noise_code") for d in ds),
            "run_dirs": [d["run_dir"] for d in ds],
            "acc_by_model": _by_model(private),
        })
    return rows


def _by_model(draws: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per evaluation architecture (cross-architecture runs): test / val mean ± std over the draws."""
    models = sorted({m for d in draws for m in d.get("acc_by_model", {})})
    out = {}
    for m in models:
        test = [d["acc_by_model"][m]["test"] for d in draws if d.get("acc_by_model", {}).get(m, {}).get("test")
                is not None]
        val = [d["acc_by_model"][m]["val"] for d in draws if d.get("acc_by_model", {}).get(m, {}).get("val")
               is not None]
        (t_mean, t_std), (v_mean, v_std) = _mean_std(test), _mean_std(val)
        out[m] = {"test_acc_mean": t_mean, "test_acc_std": t_std, "val_acc_mean": v_mean, "val_acc_std": v_std,
                  "draws": len(test), "test_acc_by_draw": test}
    return out


def _common_versions(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Versions shared by every draw (a differing package shows as a list of its versions)."""
    keys = sorted({k for d in draws for k in d.get("versions", {}) if k != "dpdistill_path"})
    out: dict[str, Any] = {}
    for k in keys:
        vals = sorted({str(d.get("versions", {}).get(k)) for d in draws})
        out[k] = vals[0] if len(vals) == 1 else vals
    return out


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


HEADER = ("| config | draws | test acc % | val acc % | by draw (test %) | DP-generated baseline % | ledger ε (max) / δ "
          "| wall s (mean) | commit | spec hash |")


def configuration_command(row: dict[str, Any]) -> str:
    """The command that reproduces ``row`` today: its spec with the configuration's current overrides (the
    draws' own overrides when the configuration is no longer in configs.yaml)."""
    sets = row.get("config_set")
    sets = row["set"] if sets is None else sets
    return " ".join(["dpdistill run", row["spec"], *(f"--set '{s}'" for s in sets)])


def ran_as_note(row: dict[str, Any]) -> str:
    """" The draws ran as …" when the draws' overrides differ from today's command (else "")."""
    if row.get("config_set") is None or list(row["config_set"]) == list(row["set"]):
        return ""
    ran = " ".join(["dpdistill run", row["spec"], *(f"--set '{s}'" for s in row["set"])])
    return (f" The draws ran `{ran}` at {', '.join(row['commits'])}, under the job's defaults of then; today's"
            " command pins them by its overrides (a new draw resolves today's schema and may open a new row).")


def render_md(doc: dict[str, Any], path: Path) -> None:
    """results/runs.md: the rows, then every draw, from runs.json (never edited by hand)."""
    rows, draws = doc.get("rows", []), doc.get("draws", [])
    lines = [
        "# runs: named configurations through `dpdistill run`",
        "",
        "Rendered from `runs.json` by `benchmarks/bench_runs.py` (do not edit; `bench_runs.py render` rewrites it).",
        "Each draw is one `dpdistill run` of the configuration's job spec and overrides (`benchmarks/configs.yaml`),",
        "with secret privacy noise, one torch thread, `nice -n 10`, on a 2-core machine shared with other work:",
        "wall times are upper bounds. acc = the run's ConvNet test accuracy (mean over the job's evaluation seeds);",
        "a row's figure is the mean ± std (ddof 1) OVER NOISE DRAWS; val = the same models on the validation split.",
        "Draws stamped NOT PRIVATE (reproducible noise) are listed but never averaged. Rows marked (reference) are",
        "non-private methods (no noise to draw): their runs are the figure, and a one-run row's ± is the spread",
        "over the job's evaluation seeds.",
        "",
        f"updated {doc.get('updated', '')}",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    current = [r for r in rows if not r.get("superseded")]
    gone = [r for r in rows if r.get("superseded")]

    def table_row(r: dict[str, Any]) -> str:
        flag = " ⚠ seeded-noise code" if r["seeded_noise_code"] else ""
        eps = "" if r["ledger_epsilon_max"] is None else f"{r['ledger_epsilon_max']:.3f} / {r['ledger_delta']:.0e}"
        return (
            f"| `{r['config']}`{flag}{' (reference, not private)' if r.get('reference') else ''}"
            f" | {r['draws']}/{r['draws_target']}"
            + (f" (+{r['draws_not_private']} NOT PRIVATE)" if r["draws_not_private"] else "")
            + f" | {_pct(r['test_acc_mean'], r['test_acc_std'])} | {_pct(r['val_acc_mean'], r['val_acc_std'])}"
            f" | {', '.join(f'{100 * a:.2f}' for a in r['test_acc_by_draw'])}"
            f" | {_pct(r['baseline_generated_acc_mean'], r['baseline_generated_acc_std'])}"
            + (f" (val {_pct(r['baseline_generated_val_acc_mean'], r['baseline_generated_val_acc_std'])})"
               if r.get("baseline_generated_val_acc_mean") is not None else "")
            + f" | {eps}"
            f" | {r['wall_s_mean']:.0f} | {', '.join(r['commits'])} | `{r['spec_hash']}` |")

    lines += [table_row(r) for r in current]
    if gone:
        lines += ["", "## Superseded rows", "",
                  "Draws of these commits ran code that changed the result under the same spec; they are kept and",
                  "listed, but they are not the configuration's figure (`superseded` in configs.yaml says why).", "",
                  HEADER + " superseded because |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [table_row(r) + f" {r['superseded']} |" for r in gone]
    crossed = [r for r in current if r.get("acc_by_model")]
    if crossed:
        lines += ["", "## Cross-architecture utility", "",
                  "Rows whose runs evaluate the release with several architectures (`evaluation.models`): each one's",
                  "test accuracy (mean over the job's evaluation seeds), then mean ± std over the row's noise draws.",
                  "", "| config | model | draws | test acc % | val acc % | by draw (test %) |", "|---|---|---|---|---|---|"]
        for r in crossed:
            for m, f in r["acc_by_model"].items():
                lines.append(f"| `{r['config']}` | {m} | {f['draws']} | {_pct(f['test_acc_mean'], f['test_acc_std'])}"
                             f" | {_pct(f['val_acc_mean'], f['val_acc_std'])}"
                             f" | {', '.join(f'{100 * a:.2f}' for a in f['test_acc_by_draw'])} |")
    lines += ["", "## Configurations", ""]
    for r in current:
        lines.append(f"- `{r['config']}`: `{configuration_command(r)}` — {r['description'].rstrip('.')}. "
                     f"Chosen by: {r['chosen_by'].rstrip('.')}." + ran_as_note(r))
    if current:
        lines += ["", "Versions (shared by every draw of a row; a list where draws differ):", ""]
        for r in current:
            lines.append(f"- `{r['config']}`: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    lines += ["", "## Draws", "", "| config | started | run folder | test % | val % | FID | ledger ε | noise | wall s "
              "| commit | release sha256 | load before/after |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in draws:
        lines.append(
            f"| `{d['config']}` | {d['started']} | `{d['run_dir']}` | {_pct(d.get('test_acc_mean'), None)}"
            f" | {_pct(d.get('val_acc_mean'), None)}"
            # A synthesiser's FID against the real test split (its job's extractor), where the run computed one.
            f" | {'' if d.get('fid') is None else format(d['fid'], '.1f')}"
            f" | {'' if d.get('ledger_epsilon') is None else format(d['ledger_epsilon'], '.3f')}"
            f" | {'NOT PRIVATE' if d['not_private'] else d.get('noise') or ''} | {d['wall_s']:.0f}"
            f" | {d['commit'][:10]}{'+dirty' if d['dirty'] else ''} | `{d.get('release_sha256', '')}`"
            f" | {d['load_before']} / {d['load_after']} |")
    failed = doc.get("failed", [])
    if failed:
        lines += ["", f"Failed draws (not averaged): {len(failed)}; see `failed` in runs.json."]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- commands


def row_status(rows: list[dict[str, Any]], name: str, resolved_hash: str) -> str:
    """Whether a configuration's current (not superseded) row was recorded under the spec it resolves to now."""
    current = [r for r in rows if r["config"] == name and not r.get("superseded")]
    if any(r["spec_hash"] == resolved_hash for r in current):
        return "its row matches"
    if current:
        return "recorded under " + ", ".join(f"{r['spec_hash']} ({r['draws']} draws at {'/'.join(r['commits'])})"
                                             for r in current)
    return "no row yet"


def cmd_check(args: argparse.Namespace) -> int:
    configs = load_configs()
    source = Source(args.snapshot, args.runs_dir)
    versions = source.versions()
    print(f"source: {source.label}, commit {source.commit[:10]}{' (dirty: ' + ', '.join(source.dirty_paths) + ')' if source.dirty else ''}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    hits = source.seeded_noise_hits()
    print(f"seeded-noise code (issue 19): {len(hits)} line(s)" + "".join(f"\n  {h}" for h in hits))
    # Rows whose spec hash differs from what the configuration resolves to now: a draw now would start a new
    # row beside them instead of adding to them (a field added since at a value the old code did not have, a
    # job-file edit the configuration does not pin, or a description change: the hash covers the whole spec).
    rows = json.loads(args.results.read_text()).get("rows", []) if args.results.exists() else []
    apart = []
    for name, c in configs.items():
        resolved = source.resolve(c)
        h = spec_hash(resolved)
        row = row_status(rows, name, h)
        if row.startswith("recorded under"):
            apart.append(name)
        print(f"{name}: {c['spec']} {' '.join(c['set'])} -> spec hash {h}, ε {resolved['privacy']['epsilon']}, "
              f"{c['draws']} draws; {row}")
    if apart:
        print(f"{len(apart)} configuration(s) resolve to another spec than their row's; a draw now starts a new "
              f"row (diff the resolved specs with --snapshot <the row's commit>): {', '.join(apart)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    configs = load_configs()
    unknown = [n for n in args.configs if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(configs)}")
    source = Source(args.snapshot, args.runs_dir)
    deadline = _parse_deadline(args.deadline) if args.deadline else None
    hits = source.seeded_noise_hits()
    if hits and not args.allow_seeded_noise:
        raise SystemExit(f"{source.label} still seeds privacy noise from spec.seed ({len(hits)} line(s), e.g. "
                         f"{hits[0]}); its figures would not be private releases (--allow-seeded-noise to run anyway)")
    for name in args.configs:
        c = configs[name]
        source.resolve(c)  # a bad override fails here, before anything runs
        done_now = 0
        while args.draws is None or done_now < args.draws:
            minutes = c.get("expected_minutes")
            if deadline is not None and minutes and datetime.now(UTC) + timedelta(minutes=minutes) > deadline:
                _say(f"{name}: a draw (~{minutes} min) would not finish before {deadline:%H:%M}Z; skipped")
                break
            claim = claim_draw(args.results, name, source.commit, None if args.draws is not None else c["draws"],
                               bool(c.get("reference")))
            if claim is None:
                _say(f"{name}: has its {c['draws']} draws at {source.commit[:10]} (done or in progress)")
                break
            try:
                record = run_draw(name, c, source, args.runs_dir, claim, args.results)
            except BaseException:
                release_claim(args.results, claim)
                raise
            done_now += 1
            if record["status"] != "completed" and args.stop_on_failure:
                return 1
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Record run folders made outside bench_runs (e.g. by hand with the configuration's command)."""
    configs = load_configs()
    c = configs[args.config]
    for rd in args.run_dirs:
        run_dir = Path(rd).resolve()
        info = read_run_folder(run_dir)
        st = json.loads((run_dir / "status.json").read_text())
        record = {"config": args.config, "draw_id": uuid.uuid4().hex[:12], "spec": c["spec"], "set": list(c["set"]),
                  "command": "(recorded from an existing run folder)", "started": st.get("started", ""),
                  "ended": st.get("ended", ""), "wall_s": float(st.get("seconds") or info.get("run_wall_s") or 0),
                  "returncode": 0 if info["status"] == "completed" else None, "commit": args.commit,
                  "dirty": args.dirty, "dirty_paths": [], "source": "recorded by hand",
                  "versions": Source(None, args.runs_dir).versions(), "seeded_noise_code": [],
                  "threads": None, "nice": None, "host": socket.gethostname(), "load_before": None,
                  "load_after": None, "log": None, **info}
        if finish_draw(args.results, None, record):
            print(f"recorded {run_dir} as a draw of {args.config}: {record['status']}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge another results file's draws into this one (a draw is known by its run folder)."""
    other = json.loads(Path(args.other).read_text())
    with locked_results(args.results) as doc:
        seen = {d.get("run_dir") for d in doc["draws"] + doc["failed"]}
        added = 0
        for key in ("draws", "failed"):
            for d in other.get(key, []):
                if d.get("run_dir") not in seen:
                    doc[key].append(d)
                    seen.add(d.get("run_dir"))
                    added += 1
    print(f"merged {added} draw(s) from {args.other}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    with locked_results(args.results) as doc:
        doc["claims"] = [c for c in doc["claims"] if _alive(c)]
    print(f"rendered {args.results} and {args.results.with_suffix('.md')}")
    return 0


def _parse_deadline(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--results", type=Path, default=RESULTS_JSON, help="results file (default: results/runs.json)")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR,
                   help="run folders (one sub-folder per configuration), logs and snapshots; keep it outside "
                        "the repository (default: /work/bench_runs)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate every configuration, print its spec hash, and whether its row "
                       "was recorded under that spec")
    c.add_argument("--snapshot", metavar="REV", help="check the code of this commit")
    r = sub.add_parser("run", help="run configurations until each has its draws (or --draws more each)")
    r.add_argument("configs", nargs="+")
    r.add_argument("--draws", type=int, help="run this many more draws of each configuration, whatever it has")
    r.add_argument("--snapshot", metavar="REV", help="run the code of this commit, not the working tree")
    r.add_argument("--deadline", help="UTC time (ISO, e.g. 2026-12-02T19:00Z): start no draw expected to end later")
    r.add_argument("--allow-seeded-noise", action="store_true",
                   help="run even though the code still seeds privacy noise from spec.seed")
    r.add_argument("--stop-on-failure", action="store_true")
    rec = sub.add_parser("record", help="record existing run folders as draws of a configuration")
    rec.add_argument("config")
    rec.add_argument("run_dirs", nargs="+")
    rec.add_argument("--commit", required=True, help="the commit the run folders were made with")
    rec.add_argument("--dirty", action="store_true", help="they ran with uncommitted changes")
    m = sub.add_parser("merge", help="merge draws from another runs.json")
    m.add_argument("other")
    sub.add_parser("render", help="recompute the rows and rewrite runs.json / runs.md")
    args = p.parse_args(argv)
    args.runs_dir = args.runs_dir.expanduser().resolve()
    if args.runs_dir.is_relative_to(REPO):
        raise SystemExit(f"--runs-dir {args.runs_dir} is inside the repository; run folders go outside it")
    return {"check": cmd_check, "run": cmd_run, "record": cmd_record, "merge": cmd_merge,
            "render": cmd_render}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
