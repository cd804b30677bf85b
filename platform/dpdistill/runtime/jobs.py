"""Ray Jobs: submit a resolved job spec to a running Ray cluster and follow it (``dpdistill submit`` / ``jobs``).

The spec is validated and resolved on the submitting machine (so a typo fails here, not on the cluster) and
shipped as the job's working directory; the cluster runs ``dpdistill run spec.yaml`` there. That working
directory is Ray's throw-away package, so run folders go to ``--runs-dir``, an absolute path on storage every
node sees (a shared volume; /runs in k8s/), and MLflow to ``--tracking-uri`` (or the cluster's
``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs-dir>/mlflow.db``). The cluster's image must have dpdistill
installed (see k8s/).

Auth: Ray 2.60's ``JobSubmissionClient`` adds the token header only when ``RAY_AUTH_MODE=token`` is set in the
client, so we send ``Authorization: Bearer <token>`` ourselves whenever a token is found (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``, the spec's ``ray.auth_token_path``, ``~/.ray/auth_token``: Ray's order).
"""

from __future__ import annotations

import re
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from dpdistill.errors import ClusterError, SpecError

# What the driver prints (cli._print_summary, runner log) that names its run folder.
_RUN_FOLDER_PATTERNS = (re.compile(r"^run folder: (\S+)", re.MULTILINE),
                        re.compile(r"\brun (/\S+) started\b"))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def dashboard_url(address: str) -> str:
    """The job server URL for ``address`` (``http://`` added when no scheme is given)."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        return f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: give the Ray dashboard (job server) URL, e.g. "
                           "http://head:8265 (ray:// and GCS addresses are for `dpdistill run --address`)")
    return address


def job_client(address: str, auth_token_path: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for the dashboard at ``address`` that authenticates with our token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from dpdistill.runtime.cluster import TOKEN_HELP, find_token

    url = dashboard_url(address)
    token = find_token(auth_token_path)
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        what = f"refused the auth token from {token.source}" if token else "requires an auth token"
        raise ClusterError(f"Ray job server {url} {what}; {TOKEN_HELP}") from None
    except Exception as e:  # noqa: BLE001 - anything else is the address: unreachable, not a job server
        raise ClusterError(f"Ray job server {url}: cannot reach it ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_durable_path(what: str, path: str, shown: str | None = None) -> None:
    """Refuse a relative path: in a Ray Job it would resolve inside the job's throw-away working directory."""
    if not PurePosixPath(path).is_absolute():
        raise SpecError(f"{what} {shown or path}: a submitted job needs an absolute path on storage every Ray node "
                        "sees (e.g. /runs on a shared volume); a relative one would land in the job's throw-away "
                        "working directory")


def check_tracking_uri(what: str, uri: str) -> None:
    """Refuse an MLflow URI that names a relative local file or folder (see ``check_durable_path``)."""
    if uri.startswith("sqlite:///"):  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
        check_durable_path(what, uri.removeprefix("sqlite:///").split("?", 1)[0], uri)
    elif uri.startswith("file:"):
        path = uri.removeprefix("file:")
        check_durable_path(what, "/" + path.lstrip("/") if path.startswith("//") else path, uri)
    elif "://" not in uri:
        check_durable_path(what, uri)


# Seconds a stopped job's driver gets between SIGTERM and SIGKILL (Ray's default is 3).
STOP_GRACE_SECONDS = 60


@dataclass
class Submission:
    """A submitted job: its Ray id and where its results will be."""

    job_id: str
    url: str
    runs_dir: str
    tracking_uri: str


def submit_job(spec: Any, address: str, workdir: Path, runs_dir: str, *, tracking_uri: str | None = None,
               driver_cpus: float | None = None, driver_gpus: float | None = None) -> Submission:
    """Submit ``spec`` to the Ray cluster whose dashboard is at ``address``.

    The job's driver runs its stages, so it gets the spec's ``resources`` (CPUs, GPUs, memory; ``driver_cpus`` /
    ``driver_gpus`` override them): Ray places it on a node that has them free (on k8s/ a worker: the head
    offers none), and a GPU request scales up a GPU worker group. A CUDA device with no GPU reserved is refused
    here: the driver would land on a CPU node and refuse there, after the upload.
    """
    cpus = spec.resources.cpus if driver_cpus is None else driver_cpus
    gpus = spec.resources.gpus if driver_gpus is None else driver_gpus
    if spec.device.startswith("cuda") and not gpus:
        raise SpecError("field 'resources.gpus': device '" + spec.device + "' needs a GPU for the job's driver, "
                        "which runs the stages; set resources.gpus: 1 (or --driver-gpus 1), or use device: auto")
    check_durable_path("--runs-dir", runs_dir)
    if tracking_uri:
        check_tracking_uri("--tracking-uri", tracking_uri)
    if spec.tracking.uri:
        check_tracking_uri("tracking.uri", spec.tracking.uri)
    if spec.data.root:
        check_durable_path("data.root", spec.data.root)
    url = dashboard_url(address)
    client = job_client(url, spec.ray.auth_token_path)
    # The driver joins the cluster it runs on ($RAY_ADDRESS) with the cluster's own token: the submitter's
    # address and token file mean nothing there.
    shipped = spec.model_copy(deep=True)
    shipped.ray.address = None
    shipped.ray.auth_token_path = None
    (workdir / "spec.yaml").write_text(shipped.to_yaml(), encoding="utf-8")
    # The job's supervisor reads RAY_JOB_STOP_WAIT_TIME_S from the job's env_vars: how long `ray job stop` waits
    # after SIGTERM before it SIGKILLs the driver. Ray's 3 s can end a stopped run before it has finished its
    # files and its MLflow run (a loaded node); the run needs seconds, not minutes, and is SIGKILLed after these.
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_SECONDS)}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    runtime_env: dict[str, Any] = {"working_dir": str(workdir), "env_vars": env_vars}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    submission_id = f"dpdistill-{re.sub(r'[^a-z0-9-]+', '-', spec.name.lower())}-{stamp}-{secrets.token_hex(2)}"
    try:
        job_id = client.submit_job(
            entrypoint=f"dpdistill run spec.yaml --runs-dir {shlex.quote(runs_dir)} --no-progress",
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={"dpdistill.job": spec.name, "dpdistill.kind": spec.kind, "dpdistill.runs_dir": runs_dir},
            entrypoint_num_cpus=cpus or None,
            entrypoint_num_gpus=gpus or None,
            entrypoint_memory=int(spec.resources.memory_gb * 2**30) if spec.resources.memory_gb else None,
        )
    except Exception as e:  # noqa: BLE001 - the job server's answer, in one line
        raise ClusterError(f"Ray job server {url}: submission refused ({_first_line(e)})") from None
    uri = tracking_uri or spec.tracking.uri or (
        f"the cluster's MLFLOW_TRACKING_URI, else sqlite:///{runs_dir.rstrip('/')}/mlflow.db")
    return Submission(job_id, url, runs_dir, uri)


def job_info(client: Any, job_id: str) -> Any:
    """The job's details (status, message, times, metadata); a one-line error when there is no such job."""
    try:
        return client.get_job_info(job_id)
    except Exception as e:  # noqa: BLE001 - 404 and friends
        raise ClusterError(f"Ray job {job_id}: {_first_line(e)}") from None


def job_logs(client: Any, job_id: str) -> str:
    """Everything the job's driver printed so far."""
    try:
        return client.get_job_logs(job_id)
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"Ray job {job_id}: {_first_line(e)}") from None


def follow_logs(client: Any, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's logs to ``write`` until the job ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    job_info(client, job_id)  # a missing job is a one-line error, not a websocket traceback
    asyncio.run(tail())


def run_folder(logs: str) -> str | None:
    """The run folder the driver reported in its logs (the last one), or None."""
    for pattern in _RUN_FOLDER_PATTERNS:
        found = pattern.findall(logs)
        if found:
            return found[-1]
    return None


def wait_job(client: Any, job_id: str, timeout: float | None = None, poll: float = 2.0,
             on_status: Callable[[str], None] | None = None) -> Any:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout`` seconds pass); returns its info."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        info = job_info(client, job_id)
        status = str(getattr(info.status, "value", info.status))
        if status != last and on_status is not None:
            on_status(status)
        last = status
        if status in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"Ray job {job_id}: still {status} after {timeout:.0f} s")
        time.sleep(poll)


def stop_job(client: Any, job_id: str) -> bool:
    """Ask Ray to stop the job (its driver gets SIGTERM); False when it had already ended."""
    try:
        return bool(client.stop_job(job_id))
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"Ray job {job_id}: {_first_line(e)}") from None
