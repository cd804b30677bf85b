"""Against a real Ray head on loopback with token auth on: joining it with the documented token variables,
refusing a bad token at once, and Ray Jobs (`dpdistill submit` / `dpdistill jobs`) end to end on `digits`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_head import ray_head

ROOT = Path(__file__).resolve().parents[1]

CONNECT = """
import sys
from dpdistill.errors import ClusterError
from dpdistill.runtime.cluster import ray_session
address, token_path = sys.argv[1] or None, sys.argv[2] or None
try:
    with ray_session(address, num_cpus=1, auth_token_path=token_path) as resources:
        print("connected", int(resources["CPU"]))
except ClusterError as e:
    print("ClusterError:", e)
"""


@pytest.fixture(scope="module")
def head():
    with ray_head(start_params=("--num-cpus=2",)) as h:
        yield h


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address / auth settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("DPDISTILL_RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["OMP_NUM_THREADS"] = "1"
    return env | extra


def _connect(address: str, env: dict[str, str], token_path: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONNECT, address, token_path], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("how", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ray.auth_token_path", "RAY_ADDRESS"])
def test_documented_token_variables_join_an_explicit_address(head, tmp_path, how):
    """Without RAY_AUTH_MODE in the environment (the old code then sent no token: 20 s of retries and
    'cannot connect'). RAY_ADDRESS is how a Ray Job's driver finds its cluster."""
    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    env = _clean_env(HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    address, token_path = head.gcs, ""
    if how == "RAY_AUTH_TOKEN":
        env["RAY_AUTH_TOKEN"] = head.token
    elif how == "RAY_AUTH_TOKEN_PATH":
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    elif how == "ray.auth_token_path":
        token_path = str(token_file)
    else:
        env |= {"RAY_ADDRESS": head.gcs, "RAY_AUTH_TOKEN": head.token}
        address = ""
    proc = _connect(address, env, token_path)
    assert "connected 2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "RAY_AUTH_MODE=disabled" not in proc.stdout + proc.stderr  # no banner inviting users to opt out


def test_a_bad_token_is_one_line_before_ray_starts(head, tmp_path):
    proc = _connect(head.gcs, _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token"))
    assert proc.stdout.startswith(f"ClusterError: Ray cluster {head.gcs} refused the auth token from "
                                  "RAY_AUTH_TOKEN;"), proc.stdout + proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1
    assert "gcs_client" not in proc.stderr  # ray.init's retry loop never ran


def test_no_token_names_the_variables(head, tmp_path):
    proc = _connect(head.gcs, _clean_env(HOME=str(tmp_path)))
    assert "requires an auth token and none was found; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" in proc.stdout
