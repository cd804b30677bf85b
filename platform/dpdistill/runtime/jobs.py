"""Ray Jobs: submit a resolved job spec to a running Ray cluster (``dpdistill submit``).

The spec is validated and resolved on the submitting machine (so a typo fails here, not on the cluster) and
shipped as the job's working directory; the cluster runs ``dpdistill run spec.yaml`` with its own data root.
The cluster's image must have dpdistill installed (see k8s/).
"""

from __future__ import annotations

from pathlib import Path

from dpdistill.errors import ClusterError


def submit_job(spec, address: str, workdir: Path, runs_dir: str = "runs") -> str:
    """Submit ``spec`` to the Ray cluster at ``address``; returns the Ray job id."""
    from ray.job_submission import JobSubmissionClient

    (workdir / "spec.yaml").write_text(spec.to_yaml(), encoding="utf-8")
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - any connection failure is the user's address or token
        raise ClusterError(f"--address {address}: cannot reach the Ray job server ({str(e).splitlines()[0]})") from None
    return client.submit_job(
        entrypoint=f"dpdistill run spec.yaml --runs-dir {runs_dir} --no-progress",
        runtime_env={"working_dir": str(workdir)},
        metadata={"dpdistill.job": spec.name, "dpdistill.kind": spec.kind},
    )
