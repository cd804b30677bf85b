"""A real Ray head for integration tests: `ray start --head --block` on loopback with token auth on.

The head runs in its own session with its own temp dir and freshly picked ports, so it never touches another
cluster on the machine; it is stopped by signalling its own process group (never `ray stop`, which stops every
cluster on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. All sockets stay bound until every port is picked: ports picked one
    at a time and released in between can repeat, and Ray refuses a node whose components share a port (a
    CI run failed that way)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class RayHead:
    """A running head: its GCS and dashboard addresses, token and log."""

    proc: subprocess.Popen
    gcs: str
    dashboard: str
    token: str
    temp_dir: Path
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def _dashboard_ready(url: str, token: str) -> bool:
    req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200 and "ray_version" in json.loads(r.read())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def alive_nodes(gcs: str, token: str) -> list[tuple[str, bool]]:
    """(node id hex, is head) of every raylet registered with the GCS (a driver attaches to one; ray.init
    waits at most 60 s for that and then reports "Failed to connect")."""
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(gcs) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            reply = stub.GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(state_filter=gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE),
                timeout=2, metadata=(("authorization", f"Bearer {token}"),))
        except grpc.RpcError:
            return []
    return [(n.node_id.hex(), n.is_head_node) for n in reply.node_info_list]


# `ray start` gives the new node a fixed 30 s to register with its GCS (ray/_private/node.py) and exits with
# "timed out during startup" past it: on a loaded 2-core machine a CI run lost a whole module's cluster that way.
# Only that exit is retried, with fresh ports and temp dir; any other failure is raised at once.
STARTUP_ATTEMPTS = 3
_NODE_START_TIMEOUT = "timed out during startup"


@contextmanager
def ray_head(env: dict[str, str] | None = None, start_params: Sequence[str] = ("--num-cpus=2",),
             token: str | None = None, startup_timeout: float = 120.0) -> Iterator[RayHead]:
    """Start a head (token auth on, dashboard on 127.0.0.1) and yield it; always stop it afterwards.

    ``env`` is added to the head's environment (a Ray Job's driver inherits it); ``start_params`` are extra
    ``ray start`` flags, e.g. a manifest's rayStartParams.
    """
    token = token or secrets.token_hex(32)
    head = _start_head(env, start_params, token, startup_timeout)
    try:
        yield head
    finally:
        stop_head(head)


def _start_head(env: dict[str, str] | None, start_params: Sequence[str], token: str,
                startup_timeout: float) -> RayHead:
    """A head whose GCS lists it and whose dashboard answers (up to STARTUP_ATTEMPTS starts, see above)."""
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        # Short: Ray's unix socket paths under the temp dir must stay below 108 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        log = temp_dir / "head.log"
        gcs_port, dash_port, client_port, *node_ports = free_ports(3 + _NODE_PORTS)
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={client_port}",
            f"--temp-dir={temp_dir}", *_node_flags(node_ports), *start_params,
        ]
        proc = _start(cmd, _node_env(token, env), log)
        head = RayHead(proc, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", token, temp_dir, log)
        try:
            _wait_until(lambda h=head: bool(alive_nodes(h.gcs, token)) and _dashboard_ready(h.dashboard, token),
                        head, "ray head", "not ready", startup_timeout)
            return head
        except BaseException:
            retry = attempt < STARTUP_ATTEMPTS and proc.poll() is not None and _NODE_START_TIMEOUT in head.log_tail()
            stop_head(head)
            if not retry:
                raise
            print(f"ray head: node start timed out (attempt {attempt}); starting again", file=sys.stderr)
    raise AssertionError("unreachable: the last attempt returns or raises")


_NODE_PORTS = 6


@contextmanager
def joined_head(start_params: Sequence[str] = ("--num-cpus=2",)) -> Iterator[RayHead]:
    """A head, joined by this (test) process as a job's driver joins it: token auth through the environment,
    ``ray_session`` connected for the block. A module fixture's whole cluster. Afterwards Ray's cached token
    is forgotten: Ray keeps the token it loaded for the life of the process, and a later module's local cluster
    (a fresh token) would refuse this one with InvalidAuthToken ("Failed to start GCS")."""
    import pytest

    from dpdistill.runtime.cluster import ray_session

    try:
        with ray_head(start_params=start_params) as head, pytest.MonkeyPatch.context() as mp:
            for var in ("RAY_ADDRESS", "DPDISTILL_RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
                mp.delenv(var, raising=False)
            mp.setenv("RAY_AUTH_TOKEN", head.token)
            mp.setenv("RAY_AUTH_MODE", "token")  # set here so the monkeypatch undoes it (ray_session would not)
            with ray_session(head.gcs):
                yield head
    finally:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _node_flags(ports: Sequence[int]) -> list[str]:
    """Loopback and the given distinct, freshly picked ports (``_NODE_PORTS`` of them, from ``free_ports``) for
    every listener a node opens: nothing shared with other clusters or between the node's own components."""
    agent, agent_grpc, env_agent, metrics, node_manager, object_manager = ports
    return [
        "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
    ]


def _node_env(token: str, env: dict[str, str] | None) -> dict[str, str]:
    node_env = dict(os.environ)
    for var in ("RAY_ADDRESS", "DPDISTILL_RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        node_env.pop(var, None)
    node_env.update({
        # A job's driver runs `dpdistill` from PATH, as in the image.
        "PATH": f"{VENV_BIN}{os.pathsep}{node_env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    })
    node_env.update(env or {})
    return node_env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def ray_worker(head: RayHead, env: dict[str, str] | None = None, start_params: Sequence[str] = (),
               startup_timeout: float = 120.0) -> Iterator[RayHead]:
    """Start a worker node that joins ``head`` (same token), as a worker group's pod does; stop it afterwards."""
    log = head.temp_dir / f"worker-{free_port()}.log"
    before = len(alive_nodes(head.gcs, head.token))
    cmd = [str(VENV_BIN / "ray"), "start", f"--address={head.gcs}", *_node_flags(free_ports(_NODE_PORTS)),
           *start_params]
    proc = _start(cmd, _node_env(head.token, env), log)
    worker = RayHead(proc, head.gcs, head.dashboard, head.token, head.temp_dir, log)
    try:
        _wait_until(lambda: len(alive_nodes(head.gcs, head.token)) > before, worker, "ray worker", "not up",
                    startup_timeout)
        yield worker
    finally:
        stop_head(worker, remove_temp_dir=False)


def _wait_until(ready: Callable[[], bool], node: RayHead, what: str, not_ready: str, timeout: float) -> None:
    """Poll ``ready`` every 0.5 s; RuntimeError with the node's log tail if its process exits or ``timeout``
    passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if node.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {node.proc.returncode}:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} {not_ready} after {timeout:.0f} s:\n{node.log_tail()}")
        time.sleep(0.5)


def stop_head(head: RayHead, remove_temp_dir: bool = True) -> None:
    """Stop a node and everything it started: SIGTERM to its process group (every Ray process of this node
    and nothing else), SIGKILL after a few seconds for anything left; then remove its temp dir."""
    sid = head.proc.pid
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(sid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + grace
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_members(sid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.proc.wait(timeout=10)
    if remove_temp_dir:
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: what the head started and has not yet exited."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids
