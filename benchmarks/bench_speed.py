"""Speed benchmark (issue 22): the timed figures of the product path, in one run on one machine.

Every figure is a ``dpdistill run`` of a checked-in job spec plus ``--set`` overrides (a subprocess, so a real
run folder), with ``threads`` pinned (default 2: the whole 2-core machine; run it on a quiet machine):

- ``dm``: seconds per DM iteration at the reference setting (MNIST, IPC 10, batch_real 256, ConvNet-3 width 128
  instance norm, full DSA): the difference of a 35- and a 5-iteration run's distillation stage, over 30
  (``jobs/dm-mnist.yaml --set method.net_width=128 --set method.batch_real=256``, evaluation off), eager
  (``compile=false``), real side float32 and bfloat16.
- ``dm_compiled``: the ``dm`` figure eager and with ``--set compile=true``, each with the real side in float32
  and in bfloat16, and the job as shipped (``compile: true``, ``real_precision: auto``), the same hour (the
  compiled runs load their graphs from a cache a first short run filled, so the compile cancels in the
  difference).
- ``dpgeng``: ``jobs/dpgeng-mnist.yaml`` at ε=1 end to end, as shipped (threads not pinned: the job takes the
  cores it finds, its evaluation models train as parallel one-thread Ray tasks): wall time, the stages' times
  and the test accuracy (one noise draw each; the accuracy over draws is benchmarks/results/runs.md's row),
  three times on a fresh cache root: cold, then twice warm (the generator's public pre-training and the compiled
  graphs restored from the caches).
- ``dpgeng_compiled``: the same with ``--set compile=true`` (dpdistill.models.compiled), which the job ships
  since a8f3ab3, so the two parts now run the same spec.
- ``dpgeng_compile_ab``: eager (``--set compile=false``) against compiled side by side on one cache root, warm
  runs in ABBA order (eager, compiled, compiled, eager) after one compiled run that fills the caches; the
  machine's speed drifts too much between parts for two separate parts to compare.
- ``dpgeng_fast_ab``: the same ABBA against ``--set compile=true --set method.real_precision=bfloat16`` (the
  matching's real side in bfloat16 as well).
- ``scaling``: seconds per DM iteration (difference of a 13- and a 3-iteration run, over 10) and the run's peak
  memory (max RSS of the run's process) at n = 10k, 30k, 55k sensitive records (``data.train_limit``; 55k is
  MNIST's whole training split) and at IPC 1, 10, 50 (n = 55k).
- ``dpsgd``: benchmarks/bench_dp_step.py's table (a DP-SGD step against a non-private step per backend).
- ``dm_reference`` (only with ``--reference-dir DIR``, a local checkout of the DM authors' repository, which is
  not part of this one): their ``main_DM.py`` loop at the same setting, timed by
  benchmarks/time_reference_dm.py, and the product's DM figures of the ``dm`` and ``dm_compiled`` parts
  recorded on the same CPU model as multiples of it.

    .venv/bin/python benchmarks/bench_speed.py                 # everything (~25 min on 2 cores)
    .venv/bin/python benchmarks/bench_speed.py --only dm,scaling --threads 2

Each part also records a machine probe (:func:`machine_probe`, a fixed workload) before and after it: this VM's
speed drifts by up to ~1.7x, so a figure compares with an older one only when their probes agree.

Results go to results/speed.{json,md} with the commit, the dirty flag and the package versions; parts not run
this time keep their previous rows, and a part's earlier rows move to the file's history ("Earlier runs", with
date and CPU) instead of being overwritten. Each part's rows are written as soon as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import RESULTS, machine, record  # noqa: E402
from bench_runs import REPO, VENV_BIN, Source  # noqa: E402

PARTS = ("dm", "dm_compiled", "dm_reference", "dpgeng", "dpgeng_compiled", "dpgeng_compile_ab", "dpgeng_fast_ab",
         "scaling", "dpsgd")
COLUMNS = ["part", "figure", "value", "unit", "setting"]
HISTORY_COLUMNS = ["part", "figure", "value", "unit", "date", "cpu", "isa", "commit"]
REFERENCE_DIR: Path | None = None  # --reference-dir: the DM authors' checkout (dm_reference)
DM_REFERENCE = ["method.net_width=128", "method.batch_real=256", "evaluation.enabled=false"]
# The job ships compile: true and real_precision: auto (bfloat16 on CPUs with AMX); the eager float32 setting the
# earlier rows measured, pinned, so that the dm and scaling parts keep measuring the same thing on any host.
EAGER_FLOAT32 = ["compile=false", "method.real_precision=float32"]


def run_job(spec: str, overrides: list[str], threads: int | None, runs_dir: Path,
            env: dict[str, str]) -> dict[str, Any]:
    """One ``dpdistill run`` (``threads`` pinned unless None); returns its run folder, metrics, stage times
    (log.txt) and peak RSS in MiB."""
    cmd = [str(VENV_BIN / "dpdistill"), "run", spec, "--runs-dir", str(runs_dir), "--no-progress"]
    if threads is not None:
        cmd += ["--set", f"threads={threads}"]
    for o in overrides:
        cmd += ["--set", o]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait4 gives THIS child's resource usage (ru_maxrss in KiB on Linux): the run's peak memory.
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    match = re.search(r"run folder: (\S+)", out)
    if not match:
        raise SystemExit(f"no run folder in the output of {' '.join(cmd)}")
    run_dir = Path(match.group(1))
    stages = {m.group(1): float(m.group(2)) for m in
              re.finditer(r"stage (.+?) completed in ([0-9.]+) s", (run_dir / "log.txt").read_text())}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"run_dir": str(run_dir), "metrics": metrics, "stages": stages, "wall": wall,
            "peak_mib": usage.ru_maxrss / 1024}


def machine_probe(threads: int) -> float:
    """Milliseconds for a fixed CPU workload (torch: a 1024x1024 matmul and a 3x3 conv, 32 -> 32 channels, on
    64 channels-last 32x32 maps, 20 times each; best of 3), timed beside every part: this VM's speed drifts (the
    same UNet step took 434 ms one day and 746 ms the next), so a part's figures compare across runs only when
    their probes agree."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(64, 32, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(20):
                    a @ b
                    conv(x)
                best = min(best, time.perf_counter() - t)
        return round(1000 * best, 1)
    finally:
        torch.set_num_threads(before)


PROBE_SETTING = "fixed kernels, 20 x (1024² matmul + 3x3 conv 32->32 on 64x32x32 NHWC), best of 3"


def distil_seconds(result: dict[str, Any]) -> float:
    """The distillation stage's seconds of a run (the stage named ``distil (<method>)``)."""
    for name, seconds in result["stages"].items():
        if name.startswith("distil"):
            return seconds
    raise SystemExit(f"{result['run_dir']}: no distillation stage in log.txt")


def per_iteration(spec: str, overrides: list[str], short: int, long: int, threads: int, runs_dir: Path,
                  env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Seconds per iteration: (distil(long) - distil(short)) / (long - short); setup cancels out."""
    a = run_job(spec, [*overrides, f"method.iterations={short}"], threads, runs_dir, env)
    b = run_job(spec, [*overrides, f"method.iterations={long}"], threads, runs_dir, env)
    return (distil_seconds(b) - distil_seconds(a)) / (long - short), b


def part_dm(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for label, extra in (("", EAGER_FLOAT32), (" (real side bfloat16)", ["compile=false",
                                                                         "method.real_precision=bfloat16"])):
        overrides = [*DM_REFERENCE, *extra]
        s, _ = per_iteration("jobs/dm-mnist.yaml", overrides, 5, 35, threads, runs_dir, env)
        rows.append({"part": "dm", "figure": f"DM seconds per iteration{label}", "value": round(s, 3),
                     "unit": "s/iter", "setting": "jobs/dm-mnist.yaml --set " + " --set ".join(overrides)
                     + "; 35 - 5 iterations"})
    return rows


def part_dm_compiled(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    # DM's reference setting eager and with compile=true, the same hour. The compiled runs share a fresh compile
    # cache, filled by a first short run, so both runs of the difference load their graphs (the compile itself
    # cancels instead of landing in the 5-iteration run only).
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="inductor-", dir=runs_dir))
    env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(cache))
    # Also the real side in bfloat16 (method.real_precision), eager and compiled: on CPUs with AMX its
    # convolutions run several times faster, and compiling then fuses what is left around them.
    # Last, the job as shipped (compile: true, real_precision: auto): the command issue 22 times.
    f32, bf16 = ["method.real_precision=float32"], ["method.real_precision=bfloat16"]
    settings = (("eager, same hour", [*DM_REFERENCE, *EAGER_FLOAT32]),
                ("compiled", [*DM_REFERENCE, *f32, "compile=true"]),
                ("real side bfloat16, eager", [*DM_REFERENCE, *bf16, "compile=false"]),
                ("real side bfloat16, compiled", [*DM_REFERENCE, *bf16, "compile=true"]),
                ("as shipped: compiled, real side auto", DM_REFERENCE))
    rows = []
    for label, overrides in settings:
        if "compile=false" not in overrides:  # fills the cache with this setting's graphs
            run_job("jobs/dm-mnist.yaml", [*overrides, "method.iterations=5"], threads, runs_dir, env)
        value, _ = per_iteration("jobs/dm-mnist.yaml", overrides, 5, 35, threads, runs_dir, env)
        rows.append({"part": "dm_compiled", "figure": f"DM seconds per iteration ({label})", "value": round(value, 3),
                     "unit": "s/iter", "setting": "jobs/dm-mnist.yaml --set " + " --set ".join(overrides)
                     + "; 35 - 5 iterations"})
    shutil.rmtree(cache, ignore_errors=True)
    return rows


def part_dm_reference(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    if REFERENCE_DIR is None:
        raise SystemExit("--only dm_reference needs --reference-dir DIR (a checkout of the DM authors' code)")
    cmd = [str(VENV_BIN / "python"), str(REPO / "benchmarks" / "time_reference_dm.py"), "--reference-dir",
           str(REFERENCE_DIR), "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    setting = (f"the authors' main_DM.py loop from {REFERENCE_DIR} (not in this repository), MNIST, IPC 10, "
               f"batch_real 256, ConvNet-3 width 128, full DSA; median of {ref['iterations']} iterations after 5")
    rows = [{"part": "dm_reference", "figure": "reference DM seconds per iteration", "value": round(ref["median_s"], 3),
             "unit": "s/iter", "setting": setting}]
    # Ratios only against the product's DM rows measured on this CPU model (the dm and dm_compiled parts): a
    # reference timed on one machine over a product figure from another compares the machines, not the code.
    previous = RESULTS / "speed.json"
    here, isa = machine()["cpu"], machine()["isa"]
    ours = [r for r in (json.loads(previous.read_text()).get("rows", []) if previous.exists() else [])
            if r.get("part") in ("dm", "dm_compiled") and r.get("unit") == "s/iter" and r.get("cpu") == here
            and r.get("isa", isa) == isa]  # and the same vector / matrix units where the row recorded them
    for r in ours:
        rows.append({"part": "dm_reference", "figure": f"reference / product ({r['figure']})",
                     "value": round(ref["median_s"] / r["value"], 2), "unit": "x",
                     "setting": f"the dm part's row of commit {r.get('commit')}, {r.get('cpu')}, {r.get('date')}"})
    return rows


def part_dpgeng(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    # As shipped (compile: true since it was measured to pay), threads not pinned: the job uses the cores it
    # finds (the distillation both, each evaluation model one, as Ray tasks side by side). Three times, on one
    # fresh cache root: cold (the generator's public pre-training runs and is stored, every graph is compiled)
    # and twice warm (restored from synthesis/cache.py's entry and inductor's cache: what a rerun, a second
    # noise draw or a sweep's next trial pays).
    # The fresh root also empties the package's other caches (fidelity extractors, diffusion bases); this job
    # uses none of them today, so the cold/warm gap is the generator's pre-training alone.
    return _dpgeng_cold_warm(threads, runs_dir, env, [], "")


def part_dpgeng_compiled(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    # The same job with compile: true (dpdistill.models.compiled), cold and warm: cold also starts from an
    # empty torch compile cache (every graph compiled), warm loads the compiled graphs the cold run stored.
    return _dpgeng_cold_warm(threads, runs_dir, env, ["compile=true"], "compiled, ")


def part_dpgeng_compile_ab(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    # Side by side, because this VM's speed drifts by up to ~1.5x within an hour: eager against compile=true.
    return _dpgeng_ab("dpgeng_compile_ab", ["compile=true"], "compiled", threads, runs_dir, env)


def part_dpgeng_fast_ab(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    # The same against the fastest setting: compiled, and the matching's real side in bfloat16
    # (method.real_precision; on CPUs with AMX its convolutions run several times faster).
    return _dpgeng_ab("dpgeng_fast_ab", ["compile=true", "method.real_precision=bfloat16"], "compiled + bf16",
                      threads, runs_dir, env)


def _dpgeng_ab(part: str, overrides: list[str], mode_name: str, threads: int, runs_dir: Path,
               env: dict[str, str]) -> list[dict[str, Any]]:
    """One fresh cache root, one run with ``overrides`` to fill it (pre-training and compiled graphs: recorded as
    its cold figure), then warm runs in the order eager, overrides, overrides, eager (ABBA, so a steady drift
    cancels in the means), each with a machine probe just before it."""
    cache_root, env = _fresh_caches(runs_dir, env)
    rows = []
    walls: dict[str, list[float]] = {"eager": [], mode_name: []}
    for i, (mode, when) in enumerate([(mode_name, "cold"), ("eager", "warm"), (mode_name, "warm"),
                                      (mode_name, "warm"), ("eager", "warm")]):
        probe = machine_probe(threads)
        r = run_job("jobs/dpgeng-mnist.yaml", overrides if mode == mode_name else ["compile=false"], None,
                    runs_dir, env)
        m = r["metrics"]
        tag = f"run {i + 1}: {mode}, {when} cache"
        if when == "warm":
            walls[mode].append(m["wall_seconds"])
        sets = "".join(" --set " + o for o in (overrides if mode == mode_name else ["compile=false"]))
        setting = f"jobs/dpgeng-mnist.yaml{sets}, threads unpinned on {threads} cores; probe before {probe} ms"
        rows += _dpgeng_rows(part, tag, setting, r, stages=("evaluate",))
    for mode, values in walls.items():
        rows.append({"part": part, "figure": f"DP-GenG ε=1 end to end, {mode}, warm (mean of 2)",
                     "value": round(sum(values) / len(values), 1), "unit": "s",
                     "setting": "runs " + ("2 and 5" if mode == "eager" else "3 and 4")})
    shutil.rmtree(cache_root, ignore_errors=True)
    return rows


def _fresh_caches(runs_dir: Path, env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A new cache root under ``runs_dir`` and ``env`` pointing the package's and inductor's caches into it."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache_root = Path(tempfile.mkdtemp(prefix="cache-", dir=runs_dir))
    return cache_root, dict(env, DPDISTILL_CACHE=str(cache_root), TORCHINDUCTOR_CACHE_DIR=str(cache_root / "inductor"))


def _dpgeng_rows(part: str, tag: str, setting: str, r: dict[str, Any], *, accuracy_label: str = "",
                 stages: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One DP-GenG run's rows: end to end, test accuracy, the runner's stages (``stages``: only those; None:
    all) and the method's own stage timers, each figure labelled ``(tag)``."""
    m = r["metrics"]
    rows = [{"part": part, "figure": f"DP-GenG ε=1 end to end ({tag})", "value": round(m["wall_seconds"], 1),
             "unit": "s", "setting": setting},
            {"part": part, "figure": f"test accuracy ({accuracy_label}{tag})", "value": round(100 * m["acc_mean"], 2),
             "unit": "%", "setting": f"{r['run_dir']}"}]
    rows += [{"part": part, "figure": f"stage {name} ({tag})", "value": round(seconds, 1), "unit": "s",
              "setting": ""} for name, seconds in r["stages"].items() if stages is None or name in stages]
    rows += [{"part": part, "figure": f"DP-GenG {key.removeprefix('seconds_')} ({tag})", "value": round(m[key], 1),
              "unit": "s", "setting": "the method's own stage timer"} for key in sorted(m) if key.startswith("seconds_")]
    return rows


def _dpgeng_cold_warm(threads: int, runs_dir: Path, env: dict[str, str], overrides: list[str],
                      label: str) -> list[dict[str, Any]]:
    cache_root, env = _fresh_caches(runs_dir, env)
    part = "dpgeng_compiled" if overrides else "dpgeng"
    rows, warm = [], []
    for when in ("cold", "warm", "warm again"):
        probe = machine_probe(threads)
        r = run_job("jobs/dpgeng-mnist.yaml", overrides, None, runs_dir, env)
        tag = f"{label}{when} cache"
        if when != "cold":
            warm.append(r["metrics"]["wall_seconds"])
        setting = (f"jobs/dpgeng-mnist.yaml{''.join(' --set ' + o for o in overrides)} (ε=1, as shipped, threads "
                   f"unpinned on {threads} cores), public pre-training and compile caches {when.split()[0]}; "
                   f"probe before {probe} ms")
        rows += _dpgeng_rows(part, tag, setting, r, accuracy_label="this draw, ")
    rows.append({"part": part, "figure": f"DP-GenG ε=1 end to end ({label}warm cache, mean of 2)",
                 "value": round(sum(warm) / len(warm), 1), "unit": "s", "setting": "the two warm runs above"})
    shutil.rmtree(cache_root, ignore_errors=True)
    return rows


def part_scaling(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    points = [("n", n, ["method.ipc=10", f"data.train_limit={n}"]) for n in (10000, 30000, 55000)]
    points += [("ipc", ipc, [f"method.ipc={ipc}"]) for ipc in (1, 50)]
    for axis, value, extra in points:
        s, r = per_iteration("jobs/dm-mnist.yaml", [*DM_REFERENCE, *EAGER_FLOAT32, *extra], 3, 13, threads,
                             runs_dir, env)
        setting = f"DM reference setting, {axis} = {value}" + (", n = 55k" if axis == "ipc" else ", IPC 10")
        rows.append({"part": "scaling", "figure": f"{axis}={value} seconds per iteration", "value": round(s, 3),
                     "unit": "s/iter", "setting": setting})
        rows.append({"part": "scaling", "figure": f"{axis}={value} peak memory", "value": round(r["peak_mib"]),
                     "unit": "MiB", "setting": setting + "; max RSS of the 13-iteration run"})
    return rows


def part_dpsgd(threads: int, runs_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    subprocess.run([str(VENV_BIN / "python"), "benchmarks/bench_dp_step.py", "--threads", str(threads)],
                   cwd=REPO, env=env, check=True)
    rows = json.loads((RESULTS / "dp_step.json").read_text())["rows"]
    return [{"part": "dpsgd", "figure": " ".join(str(r.get(k, "")) for k in ("model", "mode")).strip(),
             "value": r.get("ratio_to_non_private", ""), "unit": "x non-private step",
             "setting": "benchmarks/results/dp_step.md"} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=Path(tempfile.gettempdir()) / "dpdistill-bench-speed")
    ap.add_argument("--reference-dir", type=Path, default=None,
                    help="dm_reference: a local checkout of the DM authors' repository (VICO-UoE/DatasetCondensation)")
    ap.add_argument("--render", action="store_true", help="only rewrite speed.md from speed.json (nothing runs)")
    args = ap.parse_args()
    if args.render:
        doc = json.loads((RESULTS / "speed.json").read_text())
        record("speed", doc["command"], doc["rows"], [*COLUMNS, "commit"], doc.get("notes", ""),
               history=doc.get("history", []), history_columns=HISTORY_COLUMNS,
               meta={k: doc[k] for k in ("date", "command", "machine")})
        return
    global REFERENCE_DIR
    REFERENCE_DIR = args.reference_dir
    parts = [p for p in args.only.split(",") if p]
    if "dm_reference" in parts and args.reference_dir is None and args.only == ",".join(PARTS):
        parts.remove("dm_reference")  # the default run: only when a checkout is given
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--only: unknown part {unknown[0]!r}; expected some of {', '.join(PARTS)}")
    source = Source(None, args.runs_dir)
    env = dict(source.env, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    previous = RESULTS / "speed.json"
    doc = json.loads(previous.read_text()) if previous.exists() else {}
    kept, history = doc.get("rows", []), doc.get("history", [])
    cpu, isa = machine()["cpu"], machine()["isa"]
    meta = {"commit": source.commit, "dirty": source.dirty_paths, "versions": source.versions(),
            "threads": args.threads, "load_before": os.getloadavg()[0]}
    for part in parts:
        probe_before = machine_probe(args.threads)
        rows = globals()[f"part_{part}"](args.threads, args.runs_dir, env)
        rows += [{"part": part, "figure": f"machine probe {when}", "value": ms, "unit": "ms",
                  "setting": f"{PROBE_SETTING}, {args.threads} threads (compare figures only across similar probes)"}
                 for when, ms in (("before", probe_before), ("after", machine_probe(args.threads)))]
        for row in rows:
            row.update(commit=meta["commit"][:10], dirty=bool(meta["dirty"]), cpu=cpu, isa=isa,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        history += [r for r in kept if r.get("part") == part]  # a rerun moves the part's rows, never drops them
        kept = [r for r in kept if r.get("part") != part] + rows
        kept.sort(key=lambda r: PARTS.index(r["part"]) if r.get("part") in PARTS else len(PARTS))
        notes = (f"Measured through `dpdistill run` with threads={args.threads}; commit {meta['commit'][:10]}"
                 f"{' (dirty: ' + ', '.join(meta['dirty']) + ')' if meta['dirty'] else ''}; "
                 f"versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items() if k != 'dpdistill_path')}; "
                 f"1-min load average before the run {meta['load_before']:.2f}.")
        record("speed", "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:]), kept,
               [*COLUMNS, "commit"], notes, history=history, history_columns=HISTORY_COLUMNS)
        print(f"{part}: {len(rows)} rows -> {RESULTS / 'speed.md'}", flush=True)


if __name__ == "__main__":
    main()
