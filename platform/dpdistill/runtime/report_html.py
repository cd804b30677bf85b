"""Self-contained HTML reports (``report.html``) of a run folder and of a sweep folder, for people to read.

A run's report shows the job, its privacy line (ε, δ and any NOT PRIVATE caveat), ε by stage and the ledger's
charges, accuracy per evaluation model, fidelity numbers, every other metric, and the released image grids; a
sweep's report shows one row per trial (searched values, the sweep's metric, the trial's ε), the sweep's composed
ε and, when ε varies across trials, an SVG scatter of the metric against ε.

What a report may show is exactly what the folder already holds: rendering reads only spec.yaml, status.json,
metrics.json, ledger.json and ``artifacts/*grid*.png`` (a sweep: summary.json, sweep.json, ledger.json and those
files of each trial run), never the data, so it adds nothing a private run has not already released. The page is
self-contained (inline CSS, images as ``data:`` URIs, no scripts, no links) so it can be mailed or archived, and
every string from the folder is HTML-escaped. Numbers carry their exact value in ``data-value`` (and metrics
their key in ``data-metric``) so a reader or a test can check them against metrics.json.

A non-private method's images (DM / DC: computed from real training images without noise) are not embedded
unless the spec opted in with ``tracking.log_nonprivate_images``: the report goes to MLflow, where those images
are kept out too.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpdistill.errors import SpecError

REPORT_NAME = "report.html"
# Written by pipelines/not_private.py for a release without a guarantee (DM, DC, SFDD without LocalDP).
RELEASE_NOT_PRIVATE = "RELEASE_NOT_PRIVATE.txt"
GRID_GLOB = "*grid*.png"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Ledger totals, shown in the accounting table; every other privacy_epsilon_<component> is a stage's ε.
_PRIVACY_TOTALS = ("privacy_epsilon", "privacy_delta", "privacy_epsilon_budget", "privacy_epsilon_remaining",
                   "privacy_epsilon_rdp", "privacy_charges")
_FIDELITY_HEADS = {"fid", "fld", "is", "inception", "precision", "recall", "density", "coverage", "kid"}


# ------------------------------------------------------------------------------------------- reading a folder

@dataclass
class RunFiles:
    """What a run folder says about itself: spec.yaml, status.json, metrics.json, ledger.json ({} if absent)."""

    path: Path
    spec: dict[str, Any]
    status: dict[str, Any]
    metrics: dict[str, Any]
    ledger: dict[str, Any]
    # An evaluate run's artifacts/source.json: the re-scored release's run, method, ε, δ and NOT PRIVATE reason.
    # Its figures describe THAT release, so its method and privacy are read from there ({} for other runs).
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def rescore(self) -> bool:
        """Whether this is an evaluate run (a finished release re-scored; nothing charged here)."""
        return self.kind == "evaluate"

    @property
    def name(self) -> str:
        return str(self.spec.get("name") or self.path.parent.name)

    @property
    def kind(self) -> str:
        return str(self.spec.get("kind", "?"))

    @functools.cached_property
    def state(self) -> str:
        """status.json's status as shown: ``lost`` for a ``running`` folder whose process is gone (liveness.py).
        Cached: the page shows it twice and both must agree, so the owner process is probed once."""
        from dpdistill.runtime.liveness import shown_status

        return shown_status(self.status)

    @property
    def method(self) -> str:
        if self.rescore:
            return f"{self.source.get('method') or '?'} (re-scored)"
        return str((self.spec.get("method") or {}).get("name", "?"))

    @property
    def dataset(self) -> str:
        return str((self.spec.get("data") or {}).get("name", "?"))

    @property
    def asked_for_privacy(self) -> bool:
        """Whether the spec set a budget (a private method), whatever the run then charged; for a re-score,
        whether the re-scored release had one."""
        if self.rescore:
            return _is_number(self.source.get("epsilon"))
        return (self.spec.get("privacy") or {}).get("epsilon") is not None or bool(self.ledger)

    @property
    def epsilon(self) -> float | None:
        """The composed ε the ledger records (PLD), else metrics.json's; 0 for a private run that charged nothing.
        A re-score: its release's ε (the source run's ledger)."""
        if self.rescore:
            return float(self.source["epsilon"]) if _is_number(self.source.get("epsilon")) else None
        composed = (self.ledger.get("composed") or {}).get("epsilon")
        if _is_number(composed):
            return float(composed)
        if _is_number(self.metrics.get("privacy_epsilon")):
            return float(self.metrics["privacy_epsilon"])
        return 0.0 if self.asked_for_privacy else None

    @property
    def delta(self) -> float | None:
        if self.rescore:
            return float(self.source["delta"]) if _is_number(self.source.get("delta")) else None
        for value in (self.ledger.get("delta"), self.metrics.get("privacy_delta")):
            if _is_number(value):
                return float(value)
        return None

    @property
    def not_private(self) -> str | None:
        """Why this run's release is NOT PRIVATE (the caveats of status.json and the ledger's guarantee), or None."""
        reasons: list[str] = []
        if self.source.get("not_private") and not self.status.get("not_private"):  # a re-score not stamped itself
            reasons.append(str(self.source["not_private"]))
        if self.status.get("not_private"):
            reasons.append(str(self.status["not_private"]))
        guarantee = self.ledger.get("guarantee")
        if guarantee and not str(guarantee).startswith("(ε, δ)-DP"):
            reasons.append(str(guarantee))
        if not reasons and self.metrics.get("not_private"):
            reasons.append("NOT PRIVATE (metrics.json: not_private)")
        unique = list(dict.fromkeys(reasons))
        return "; ".join(unique) if unique else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a JSON object")
    return data


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder's own files; a folder without status.json is not a run (SpecError, one line)."""
    import yaml

    path = Path(run_dir)
    if not (path / "status.json").is_file():
        raise SpecError(f"{path}: not a run folder (no status.json); give runs/<job-name>/<stamp>/ or a job folder")
    spec: dict[str, Any] = {}
    if (path / "spec.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "spec.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"{path / 'spec.yaml'}: not readable YAML ({e})") from None
        spec = loaded if isinstance(loaded, dict) else {}
    source = _read_json(path / "artifacts" / "source.json") if spec.get("kind") == "evaluate" else {}
    return RunFiles(path=path, spec=spec, status=_read_json(path / "status.json"),
                    metrics=_read_json(path / "metrics.json"), ledger=_read_json(path / "ledger.json"), source=source)


# --------------------------------------------------------------------------------------------- formatting

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_fraction(key: str) -> bool:
    """Whether metric ``key`` is a fraction in [0, 1] that reads better as a percentage (as `dpdistill report`)."""
    return bool(re.search(r"(^|_)(acc|accuracy|precision|recall)(_|$)|_rate(_|$)", key))


def fmt_number(value: Any, percent: bool = False) -> str:
    """A number for people: percentages with two decimals, else four significant digits."""
    if not _is_number(value):
        return "—" if value is None else str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if percent:
        return f"{100 * v:.2f} %"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, *, metric: str | None = None, percent: bool = False, elem_id: str | None = None,
         tag: str = "td") -> str:
    """A number in an element carrying its exact value (``data-value``) and, for metrics.json keys, the key."""
    attrs = ""
    if elem_id:
        attrs += f' id="{_e(elem_id)}"'
    if metric is not None:
        attrs += f' class="metric" data-metric="{_e(metric)}"'
    if _is_number(value):
        attrs += f' data-value="{_e(repr(float(value)))}"'
    return f"<{tag}{attrs}>{_e(fmt_number(value, percent))}</{tag}>"


def _table(head: Iterable[str], rows: Iterable[str], elem_id: str, caption: str = "") -> str:
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    ths = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table id="{_e(elem_id)}">{cap}<thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:72rem;color:#1b1f24;
padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}caption{text-align:left;color:#57606a;
padding-bottom:.3rem}th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td[data-value]{text-align:right;font-variant-numeric:tabular-nums}
.privacy{padding:.6rem .9rem;border-radius:6px;background:#dafbe1;border:1px solid #4ac26b}
.privacy.none{background:#f6f8fa;border-color:#d0d7de}
.not-private{padding:.6rem .9rem;border-radius:6px;background:#ffebe9;border:2px solid #cf222e;color:#82071e;
font-weight:600}.muted{color:#57606a;font-size:.88rem}img.grid{image-rendering:pixelated;max-width:100%;
border:1px solid #d0d7de}figure{margin:1rem 0}tr.best{background:#fff8c5}svg text{font-size:11px;fill:#1b1f24}
"""


def _page(title: str, body: list[str]) -> str:
    # No scripts, no links, no remote fonts: the page shows the same wherever it is opened, and offline.
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"dpdistill\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ a run

def _job_section(run: RunFiles) -> str:
    st = run.status
    ev = run.spec.get("evaluation") or {}
    rows = [("name", run.name), ("description", run.spec.get("description") or "—"), ("kind", run.kind),
            ("method", run.method), ("dataset", run.dataset), ("seed", run.spec.get("seed", "")),
            ("status", run.state)]
    if st.get("error"):
        rows.append(("error", st["error"]))
    if st.get("interrupted_by"):
        rows.append(("interrupted by", st["interrupted_by"]))
    seconds = st.get("seconds", run.metrics.get("wall_seconds"))
    rows.append(("wall time", f"{float(seconds):.1f} s" if _is_number(seconds) else "—"))
    for key in ("started", "ended", "device", "mlflow_run_id"):
        if st.get(key):
            rows.append((key.replace("_", " "), st[key]))
    # Provenance (runtime/provenance.py: every run folder records it in status.json).
    prov = st.get("provenance") or {}
    if prov:
        commit = prov.get("commit") or "unknown (not a git checkout)"
        rows.append(("code", f"dpdistill {prov.get('dpdistill', '?')}, commit {commit}"
                     + (" (with uncommitted changes)" if prov.get("dirty") else "")))
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in
                                           {"python": prov.get("python"), **prov.get("versions", {})}.items() if v)))
    if ev:
        rows.append(("evaluation protocol", f"{ev.get('model', '?')}, {ev.get('seeds', '?')} seeds, "
                     f"{ev.get('epochs', '?')} epochs, augment {ev.get('augment', '?')}"))
    rows.append(("run folder", f"{run.path.parent.name}/{run.path.name}"))
    body = "".join(f'<tr><th>{_e(k)}</th><td id="job-{_e(k.replace(" ", "-"))}">{_e(v)}</td></tr>'
                   for k, v in rows)
    return f'<h2>Job</h2><table id="job"><tbody>{body}</tbody></table>'


def _privacy_section(run: RunFiles) -> tuple[str, set[str]]:
    """The privacy line, ε by stage, the accounting totals and the ledger table; returns the metric keys shown."""
    shown: set[str] = set()
    parts = ["<h2>Privacy</h2>"]
    caveat = run.not_private
    eps, delta = run.epsilon, run.delta
    if caveat:
        parts.append(f'<p id="not-private" class="not-private">{_e(caveat)}</p>')
    if run.rescore:
        of = "no privacy" if eps is None else (f"ε = {fmt_number(eps)}, δ = "
                                              f"{'—' if delta is None else f'{delta:.3g}'} (its own ledger)")
        line = (f"re-score of the release of {run.source.get('run', '?')} ({of}): training models on a released "
                "set is post-processing; this run charged nothing")
        cls = "privacy none" if caveat or eps is None else "privacy"
    elif not run.asked_for_privacy:
        line = "none: not a private release (the method takes no privacy budget)"
        cls = "privacy none"
    else:
        budget = run.ledger.get("epsilon_budget", (run.spec.get("privacy") or {}).get("epsilon"))
        neighbouring = run.ledger.get("neighbouring", "add-or-remove-one")
        line = (f"ε = {fmt_number(eps)} (PLD) of budget {fmt_number(budget)}, δ = "
                f"{'—' if delta is None else f'{delta:.3g}'}, {neighbouring} neighbouring datasets of the "
                "sensitive training split")
        if not run.ledger:
            line += "; no ledger.json: nothing was charged"
        if caveat:
            line = "NOT PRIVATE: the ledger's figure does not describe this release. The ledger says " + line
            cls = "privacy none"
        else:
            line += f"; guarantee: {run.ledger.get('guarantee', '(ε, δ)-DP')}"
            cls = "privacy"
    eps_attr = f' data-epsilon="{_e(repr(eps))}"' if eps is not None else ""
    delta_attr = f' data-delta="{_e(repr(delta))}"' if delta is not None else ""
    parts.append(f'<p id="privacy-line" class="{cls}"{eps_attr}{delta_attr}>{_e(line)}</p>')
    if run.metrics.get("not_private") is not None:
        shown.add("not_private")
        parts.append(f'<p class="muted">metrics.json not_private = '
                     f'{_num(run.metrics["not_private"], metric="not_private", tag="span")}</p>')

    stages = {k: v for k, v in run.metrics.items() if k.startswith("privacy_epsilon_") and k not in _PRIVACY_TOTALS}
    if stages:
        rows = [f"<tr><td>{_e(k.removeprefix('privacy_epsilon_'))}</td>{_num(v, metric=k)}</tr>"
                for k, v in sorted(stages.items())]
        parts.append(_table(("stage", "ε alone"), rows, "epsilon-by-stage",
                            "each stage's ε on its own (PLD); the total is composed tightly, so parts need not add up"))
        shown |= set(stages)
    totals = [k for k in _PRIVACY_TOTALS if k in run.metrics]
    if totals:
        rows = [f"<tr><td>{_e(k)}</td>{_num(run.metrics[k], metric=k)}</tr>" for k in totals]
        parts.append(_table(("accounting figure", "value"), rows, "accounting",
                            "from metrics.json; RDP is shown beside PLD, the PLD figure is the guarantee"))
        shown |= set(totals)

    entries = run.ledger.get("entries") or []
    if run.ledger:
        rows = []
        for i, entry in enumerate(entries):
            index = entry.get("index", i)
            rows.append(
                f'<tr class="ledger-entry" data-index="{_e(index)}"><td>{_e(index)}</td>'
                f"<td>{_e(entry.get('component', ''))}</td><td>{_e(entry.get('description', ''))}"
                + (f"<br><span class=\"muted\">{_e(entry['note'])}</span>" if entry.get("note") else "")
                + f"</td>{_num(entry.get('epsilon_alone'))}{_num(entry.get('epsilon_total_after'))}"
                f"<td>{_e(entry.get('recorded_at', ''))}</td></tr>")
        composed = run.ledger.get("composed") or {}
        caption = (f"ledger.json: {len(entries)} charge(s), composed ε {fmt_number(composed.get('epsilon'))} at "
                   f"δ {fmt_number(composed.get('delta'))} by {(run.ledger.get('accountant') or {}).get('authority', '?')}"
                   f"; noise {run.ledger.get('noise', '?')}")
        parts.append(_table(("#", "component", "mechanism", "ε alone", "ε after this charge", "recorded"), rows,
                            "ledger", caption))
    return "".join(parts), shown


def _split(key: str) -> list[str]:
    return key.split("_")


def _accuracy_pairs(metrics: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, mean key, std key or None) for every accuracy mean in metrics.json (any model, any split)."""
    pairs = []
    for key in sorted(metrics):
        tokens = _split(key)
        if "mean" in tokens and any(t in ("acc", "accuracy") for t in tokens):
            std = "_".join("std" if t == "mean" else t for t in tokens)
            label = "_".join(t for t in tokens if t != "mean")
            pairs.append((label, key, std if std in metrics else None))
    return pairs


def _is_fidelity(key: str) -> bool:
    tokens = _split(key)
    return tokens[0] in _FIDELITY_HEADS or any(t in ("fid", "fld", "kid") for t in tokens)


def _metrics_sections(run: RunFiles, shown: set[str]) -> str:
    m = run.metrics
    parts = []
    pairs = _accuracy_pairs(m)
    if pairs:
        ev = run.spec.get("evaluation") or {}
        rows = []
        for label, mean, std in pairs:
            rows.append(f"<tr><td>{_e(label)}</td>{_num(m[mean], metric=mean, percent=True)}"
                        + (_num(m[std], metric=std, percent=True) if std else "<td>—</td>") + "</tr>")
            shown.update(k for k in (mean, std) if k)
        parts.append("<h2>Accuracy</h2>" + _table(
            ("evaluation", "mean", "± std"), rows, "accuracy",
            f"fresh models trained on the release (evaluation.model {ev.get('model', '?')}; other models as named); "
            "acc_* on the real test split, val_* on the validation split: held-out splits the guarantee does not "
            "cover"))
    fidelity = [k for k in sorted(m) if k not in shown and _is_fidelity(k)]
    if fidelity:
        rows = [f"<tr><td>{_e(k)}</td>{_num(m[k], metric=k, percent=is_fraction(k))}</tr>" for k in fidelity]
        parts.append("<h2>Fidelity</h2>" + _table(("metric", "value"), rows, "fidelity",
                                                  "against the real test split (extractor: see the summary)"))
        shown.update(fidelity)
    rest = [k for k in sorted(m) if k not in shown]
    if rest:
        rows = [f"<tr><td>{_e(k)}</td>{_num(m[k], metric=k, percent=is_fraction(k))}</tr>" for k in rest]
        parts.append("<h2>Other metrics</h2>" + _table(("metric", "value"), rows, "other-metrics"))
    return "".join(parts)


def _summary_section(run: RunFiles) -> str:
    summary = run.status.get("summary") or []
    rows = [f"<tr><th>{_e(r[0])}</th><td>{_e(r[1])}</td></tr>" for r in summary
            if isinstance(r, (list, tuple)) and len(r) == 2]
    if not rows:
        return ""
    return f'<h2>Summary</h2><table id="summary"><tbody>{"".join(rows)}</tbody></table>'


def withheld_images(run: RunFiles) -> set[str]:
    """Image grids the report must not embed: a non-private method's images, unless the spec opted them in."""
    if not (run.path / "artifacts" / RELEASE_NOT_PRIVATE).is_file():
        return set()
    if (run.spec.get("tracking") or {}).get("log_nonprivate_images"):
        return set()
    return {p.name for p in (run.path / "artifacts").glob(GRID_GLOB)}


def _images_section(run: RunFiles, withhold: Collection[str]) -> str:
    art = run.path / "artifacts"
    grids = sorted(art.glob(GRID_GLOB)) if art.is_dir() else []
    if not grids:
        return ""
    skip = set(withhold) | withheld_images(run)
    parts = ["<h2>Released images</h2>"]
    for p in grids:
        if p.name in skip:
            parts.append(f'<p class="muted withheld" data-image="{_e(p.name)}">{_e(p.name)}: not embedded. The '
                         "method is not private: its images are computed from real training images without noise "
                         "and stay in the run folder's artifacts/ (tracking.log_nonprivate_images: true includes "
                         "them).</p>")
            continue
        data = p.read_bytes()
        if not data.startswith(_PNG_MAGIC):
            parts.append(f'<p class="muted">{_e(p.name)}: not a PNG file, not embedded.</p>')
            continue
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img class="grid" data-image="{_e(p.name)}" alt="{_e(p.name)}" src="{uri}">'
                     f"<figcaption class=\"muted\">{_e(p.name)}</figcaption></figure>")
    return "".join(parts)


def render_run_report(run_dir: str | Path, *, status: dict[str, Any] | None = None,
                      withhold: Collection[str] = ()) -> str:
    """The HTML report of a run folder, from its own files only.

    ``status`` overrides status.json's fields (the runner renders before it writes the final status);
    ``withhold`` names artifact images not to embed (besides a non-private method's, always withheld unless
    the spec opted in).
    """
    run = read_run(run_dir)
    if status:
        run.status = {**run.status, **{k: v for k, v in status.items() if v is not None}}
    privacy, shown = _privacy_section(run)
    title = f"dpdistill · {run.name} ({run.kind}/{run.method})"
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="muted">{_e(run.dataset)} · status {_e(run.state)} · '
            f"{_e(run.path.name)}</p>",
            _job_section(run), privacy, _metrics_sections(run, shown), _images_section(run, withhold),
            _summary_section(run)]
    return _page(title, body)


def write_run_report(run_dir: str | Path, **kwargs: Any) -> Path:
    """Render the run's report and write it to ``<run_dir>/report.html`` atomically; returns its path."""
    from dpdistill.runtime.runfolder import atomic_write_text

    path = Path(run_dir) / REPORT_NAME
    atomic_write_text(path, render_run_report(run_dir, **kwargs))
    return path


# ---------------------------------------------------------------------------------------------- a sweep

def _dotted(doc: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def _trial_runs(sweep_dir: Path) -> list[tuple[str, list[Path]]]:
    """(trial id, its run folders oldest first) for ``trials/<trial>/<job>/<stamp>/`` (as runtime/sweeps.py)."""
    trials = sweep_dir / "trials"
    if not trials.is_dir():
        return []
    out = []
    for trial in sorted(p for p in trials.iterdir() if p.is_dir()):
        folders = sorted((s.parent for s in trial.glob("*/*/status.json")), key=lambda p: p.name)
        if folders:
            out.append((trial.name, folders))
    return out


def scatter_svg(points: list[tuple[float, float, str, bool]], x_label: str, y_label: str, *,
                y_percent: bool = False, width: int = 520, height: int = 320) -> str:
    """An inline SVG scatter of (x, y, label, highlighted) points with linear axes and five ticks each."""
    left, right, top, bottom = 64, 16, 16, 44
    xs, ys = [p[0] for p in points], [p[1] for p in points]

    def span(lo: float, hi: float) -> tuple[float, float]:
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            pad = 0.05 * max(abs(hi), 1e-3)
            return lo - pad, hi + pad
        pad = 0.06 * (hi - lo)
        return lo - pad, hi + pad

    x0, x1 = span(min(xs), max(xs))
    y0, y1 = span(min(ys), max(ys))
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg id="privacy-utility" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(y_label)} against {_e(x_label)}">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#8c959f"/>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * (i + 0.5) / 5, y0 + (y1 - y0) * (i + 0.5) / 5
        out.append(f'<line x1="{sx(xv):.1f}" y1="{top + ph}" x2="{sx(xv):.1f}" y2="{top + ph + 4}" stroke="#57606a"/>'
                   f'<text x="{sx(xv):.1f}" y="{top + ph + 16}" text-anchor="middle">{_e(f"{xv:.3g}")}</text>')
        out.append(f'<line x1="{left - 4}" y1="{sy(yv):.1f}" x2="{left}" y2="{sy(yv):.1f}" stroke="#57606a"/>'
                   f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">'
                   f'{_e(f"{100 * yv:.3g} %" if y_percent else f"{yv:.3g}")}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f"{_e(y_label)}</text>")
    for x, y, label, best in points:
        out.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{6 if best else 4.5}" '
                   f'fill="{"#bf8700" if best else "#0969da"}" fill-opacity="0.8" data-trial="{_e(label)}" '
                   f'data-epsilon="{_e(repr(x))}" data-value="{_e(repr(y))}"><title>{_e(label)}: ε {x:.4g}, '
                   f"{_e(y_label)} {_e(fmt_number(y, y_percent))}</title></circle>")
    out.append("</svg>")
    return "".join(out)


def render_sweep_report(sweep_dir: str | Path) -> str:
    """The HTML privacy–utility report of a sweep folder: one row per trial, the composed ε, the scatter."""
    import yaml

    sweep_dir = Path(sweep_dir)
    summary = _read_json(sweep_dir / "summary.json")
    state = _read_json(sweep_dir / "sweep.json")
    if not summary and not state:
        raise SpecError(f"{sweep_dir}: not a sweep folder (no summary.json or sweep.json)")
    ledger = _read_json(sweep_dir / "ledger.json")
    metric = str(summary.get("metric") or (state.get("sweep") or {}).get("metric") or "?")
    search = list(((state.get("sweep") or {}).get("search") or {}).keys()) or sorted(summary.get("best_config") or {})
    best_run = summary.get("best_run_dir")
    name = summary.get("sweep") or (state.get("sweep") or {}).get("name") or sweep_dir.parent.name
    title = f"dpdistill sweep · {name}"

    rows, points = [], []
    for trial, folders in _trial_runs(sweep_dir):
        run = read_run(folders[-1])  # the latest attempt; earlier (interrupted) ones still count in the ledger
        try:
            spec = yaml.safe_load((run.path / "spec.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            spec = {}
        value = run.metrics.get(metric)
        eps = run.epsilon
        best = best_run is not None and Path(str(best_run)).parts[-3:] == run.path.parts[-3:]
        searched = "".join(f"<td>{_e(fmt_number(_dotted(spec, k)))}</td>" for k in search)
        flag = run.not_private or ""
        rows.append(
            f'<tr class="trial{" best" if best else ""}" data-trial="{_e(trial)}"><td>{_e(trial)}</td>'
            f"<td>{_e(run.state)}</td>{searched}"
            f"{_num(value, metric=metric, percent=is_fraction(metric))}"
            f"{_num(run.metrics.get('acc_mean'), metric='acc_mean', percent=True)}"
            f'{_num(eps)}{_num(run.delta)}<td>{len(folders)}</td><td>{_e(flag)}</td>'
            f"<td>{_e(run.path.relative_to(sweep_dir))}</td></tr>")
        if _is_number(value) and eps is not None and math.isfinite(float(value)):
            points.append((float(eps), float(value), trial, best))

    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="muted">status {_e(summary.get("status", "?"))} · {_e(summary.get("trials", len(rows)))} of '
            f'{_e(summary.get("num_samples", "?"))} trials ended ({_e(summary.get("failed_trials", 0))} failed) · '
            f"{_e(sweep_dir.name)}</p>"]
    guarantee = ledger.get("guarantee")
    if summary.get("not_private") or (guarantee and not str(guarantee).startswith("(ε, δ)-DP")):
        body.append(f'<p id="not-private" class="not-private">{_e(guarantee or "NOT PRIVATE")}</p>')
    sweep_eps = summary.get("sweep_epsilon")
    attrs = f' data-epsilon="{_e(repr(float(sweep_eps)))}"' if _is_number(sweep_eps) else ""
    if _is_number(summary.get("sweep_delta")):
        attrs += f' data-delta="{_e(repr(float(summary["sweep_delta"])))}"'
    body.append("<h2>Privacy</h2>")
    body.append(f'<p id="privacy-line" class="privacy{"" if _is_number(sweep_eps) else " none"}"{attrs}>'
                f'{_e(summary.get("privacy", "—"))}</p>')
    body.append(f'<p id="selection" class="muted">selection: {_e(summary.get("selection", "—"))}</p>')
    if summary.get("best_value") is not None:
        body.append(f'<p>best {_e(metric)} = {_num(summary["best_value"], tag="span", percent=is_fraction(metric))}'
                    f" with {_e(json.dumps(summary.get('best_config'), sort_keys=True))}</p>")
    head = ("trial", "status", *search, metric, "acc_mean (test)", "ε (trial)", "δ", "attempts", "caveat",
            "run folder")
    body.append("<h2>Trials</h2>" + _table(head, rows, "trials",
                                           "one row per trial (its latest attempt); ε is the trial's own ledger"))
    if len({round(p[0], 9) for p in points}) > 1:
        body.append("<h2>Privacy–utility</h2>" + scatter_svg(points, "ε (trial, PLD)", metric,
                                                                 y_percent=is_fraction(metric)))
    elif points:
        body.append('<p class="muted" id="no-curve">Every trial has the same ε: no privacy–utility curve.</p>')
    if summary.get("errors"):
        body.append("<h2>Errors</h2><ul>" + "".join(f"<li>{_e(e)}</li>" for e in summary["errors"]) + "</ul>")
    return _page(title, body)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Render the sweep's report and write it to ``<sweep_dir>/report.html`` atomically; returns its path."""
    from dpdistill.runtime.runfolder import atomic_write_text

    path = Path(sweep_dir) / REPORT_NAME
    atomic_write_text(path, render_sweep_report(sweep_dir))
    return path
