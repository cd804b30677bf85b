"""Run what k8s/ describes on this machine: the MLflow server with its Deployment's arguments, and the
RayJob's entrypoint and environment. Only what exists inside a pod alone is mapped to a local equivalent:
the mount paths of volumes and the image's working directory (to temporary folders / this checkout), the
in-cluster service URLs (to loopback), the PostgreSQL store (to SQLite) and 0.0.0.0 (to 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml

from ray_head import VENV_BIN, free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"


def manifest(name: str, kind: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d and d["kind"] == kind]
    return doc


def mlflow_container() -> dict:
    (c,) = manifest("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def mlflow_server_command(workdir: Path, port: int, allowed_hosts: bool = True) -> list[str]:
    """The Deployment's `mlflow server` command with the local mappings; every other argument verbatim."""
    c = mlflow_container()
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    args = []
    for arg in c["args"]:
        flag, _, value = arg.partition("=")
        if flag == "--host":
            assert value == "0.0.0.0"
            arg = "--host=127.0.0.1"
        elif flag == "--port":
            assert value == "5000"
            arg = f"--port={port}"
        elif flag == "--backend-store-uri":
            assert value.startswith("postgresql://")
            arg = f"--backend-store-uri=sqlite:///{workdir / 'mlflow.db'}"
        elif flag == "--artifacts-destination":
            assert value in mounts  # a volume of the pod
            arg = f"--artifacts-destination={workdir / 'artifacts'}"
        elif flag == "--allowed-hosts" and not allowed_hosts:
            continue
        args.append(arg)
    return [str(VENV_BIN / c["command"][0]), *c["command"][1:], *args]


@contextmanager
def mlflow_server(workdir: Path, allowed_hosts: bool = True, timeout: float = 120.0,
                  wait: bool = True) -> Iterator[str]:
    """Start the manifest's MLflow server on loopback; yields its URL (once healthy, unless ``wait`` is
    False: then call ``wait_healthy``); stops its whole process group."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {e["name"]: e["value"] for e in mlflow_container().get("env", []) if "value" in e}  # the pod's env
    with open(log, "wb") as out:
        proc = subprocess.Popen(mlflow_server_command(workdir, port, allowed_hosts), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    _servers[url] = (proc, log)
    try:
        if wait:
            wait_healthy(url, timeout)
        yield url
    finally:
        _servers.pop(url, None)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


_servers: dict[str, tuple[subprocess.Popen, Path]] = {}


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Block until the server at ``url`` (started by ``mlflow_server``) answers /health."""
    proc, log = _servers[url]
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def request(url: str, path: str, host: str, method: str = "GET", body: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, bytes]:
    """One HTTP request with an explicit Host header (as an in-cluster client would send it)."""
    req = urllib.request.Request(f"{url}{path}", data=body, method=method,
                                 headers={"Host": host, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def kuberay_start_params(group: dict) -> list[str]:
    """The `ray start` flags KubeRay gives a group's pods: its rayStartParams, plus --num-cpus / --num-gpus /
    --memory from the container's limits where rayStartParams does not set them."""
    params = {k: str(v) for k, v in group.get("rayStartParams", {}).items()}
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    params.setdefault("num-cpus", str(_cpus(limits["cpu"])))
    if "nvidia.com/gpu" in limits:
        params.setdefault("num-gpus", str(limits["nvidia.com/gpu"]))
    params.setdefault("memory", str(_bytes(limits["memory"])))
    return [f"--{k}={v}" for k, v in params.items()]


def _cpus(quantity: str) -> int:
    return max(1, int(quantity[:-1]) // 1000) if quantity.endswith("m") else int(float(quantity))


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def container_env(group: dict, mapping: dict[str, str]) -> dict[str, str]:
    """A Ray group's container env with ``mapping`` (value -> local value) applied to whole values."""
    (container,) = group["template"]["spec"]["containers"]
    return {e["name"]: mapping.get(e["value"], e["value"]) for e in container.get("env", [])}
