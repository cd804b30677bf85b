"""The README's two commands are the ones that work: .ci/run runs the README's test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"README test command {test_cmd!r} not found verbatim in .ci/run"


def test_readme_quickstart_command_runs_the_quickstart_job():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    first = blocks[0]
    assert first.startswith("python3.11 -m venv .venv") and "dpdistill run jobs/quickstart.yaml" in first
    assert (ROOT / "jobs" / "quickstart.yaml").is_file()
