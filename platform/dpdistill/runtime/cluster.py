"""Ray clusters: a local one with the spec's CPUs (dashboard off), or an existing cluster by address.

Ray >= 2.59 turns token authentication on by default. A local ``ray.init`` generates its own token; to join a
running cluster the token must come from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` (set from the spec's
``ray.auth_token_path``) or Ray's default token file. We never switch authentication off: a missing token is a
one-line error that says where to put it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from dpdistill.errors import ClusterError

log = logging.getLogger("dpdistill.cluster")

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token").expanduser()


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).is_file()
    return DEFAULT_TOKEN_FILE.is_file()


def _auth_disabled() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, auth_token_path: str | None = None
) -> Iterator[dict]:
    """Start (or join) Ray for the duration of a job; yields the cluster's resources.

    If Ray is already initialised in this process (tests, notebooks, a Ray Job's driver) it is reused and
    left running.
    """
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    if auth_token_path:
        token_file = Path(auth_token_path).expanduser()
        if not token_file.is_file():
            raise ClusterError(f"ray.auth_token_path: token file {token_file} not found")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    address = address or os.environ.get("DPDISTILL_RAY_ADDRESS")
    if address and not _auth_disabled() and not _token_available():
        raise ClusterError(
            f"Ray cluster {address}: no auth token found; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            f"(or ray.auth_token_path in the spec), e.g. from `ray get-auth-token` on the head node"
        )
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
    except ConnectionError as e:
        raise ClusterError(f"Ray cluster {address}: cannot connect ({str(e).splitlines()[0]})") from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
