"""Ray clusters: a local one with the spec's CPUs (dashboard off), or an existing cluster by address.

Which cluster: an explicit address (``--address`` / the spec's ``ray.address``), else ``$DPDISTILL_RAY_ADDRESS``,
else ``$RAY_ADDRESS``, which Ray sets in a Ray Job's driver (``dpdistill submit``, a KubeRay RayJob): a job
driver joins its cluster and never passes ``num_cpus`` (Ray refuses that for an existing cluster).

Authentication: Ray >= 2.59 turns token authentication on by default. A local ``ray.init`` generates its own
token. To join a running cluster the token comes, in Ray's own order, from ``RAY_AUTH_TOKEN``, the spec's
``ray.auth_token_path`` (exported as ``RAY_AUTH_TOKEN_PATH``), ``RAY_AUTH_TOKEN_PATH``, or Ray's default token
file ``~/.ray/auth_token``. Ray 2.60 only sends a token to an explicit address when ``RAY_AUTH_MODE=token`` is
set in the client, so when a token is available and the mode is unset we set it (a client setting: it turns
authentication on for this process, never off). Before ``ray.init`` one gRPC call to the cluster's GCS proves
the address and the token, so a wrong token is one line in milliseconds, not Ray's 20-second retry loop that
ends in "cannot connect". We never switch authentication off, and we hide only Ray's banner that invites users
to (``RAY_AUTH_MODE=disabled``), not its other warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dpdistill.errors import ClusterError

log = logging.getLogger("dpdistill.cluster")

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token").expanduser()
TOKEN_HELP = ("set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ray.auth_token_path in the spec) to the cluster's "
              "token, e.g. from `ray get-auth-token` on the head node or KubeRay's <cluster>-auth secret")
# Where Ray 2.60 logs "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" on every
# local ray.init (authentication_token_setup._warn_token_auth_enabled).
_BANNER_LOGGER = "ray._private.authentication.authentication_token_setup"
# How long the pre-connection check waits for the GCS to answer (a refused port answers at once).
CHECK_TIMEOUT_S = 10.0


class LocalRayStartError(ClusterError):
    """A local Ray (no address given) failed to start in this process.

    On a loaded machine Ray's node start can exceed its fixed 30 s wait for the raylet to register
    (``ray/_private/node.py``: "The current node timed out during startup"). A caller whose work can run in
    this process instead (the evaluation of a release already charged and saved) catches this and does so."""


def _stop_half_started_node(err: BaseException) -> bool:
    """Stop the processes of a local node whose start raised ``err``; True if there was one to stop.

    ``ray.init`` builds its head node inside its own call and drops it when the start fails, so its GCS, raylet
    and reaper would run on (prestarting workers once the raylet registers) until this process exits. The node
    object is still in the traceback's ``Node.__init__`` frame; stopping it there is best effort (a Ray
    internal) and never hides the start's own error."""
    try:
        from ray._private.node import Node
    except ImportError:  # pragma: no cover - another Ray layout: nothing we can reach
        return False
    tb = err.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("self")
        if isinstance(node, Node):
            try:
                node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            except Exception as stop_err:  # noqa: BLE001 - best effort; the caller reports the start's error
                log.warning("could not stop the processes of the failed local Ray start: %s", stop_err)
            return True
        tb = tb.tb_next
    return False


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@dataclass(frozen=True)
class AuthToken:
    """A Ray auth token and where it came from (for error messages; the value is never printed)."""

    value: str
    source: str


def cluster_address(address: str | None = None) -> str | None:
    """The existing cluster to join (explicit, $DPDISTILL_RAY_ADDRESS, $RAY_ADDRESS), or None for a local one."""
    for candidate in (address, os.environ.get("DPDISTILL_RAY_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and candidate.strip() and candidate.strip() != "local":
            return candidate.strip()
    return None


def find_token(auth_token_path: str | None = None) -> AuthToken | None:
    """The token a client sends, in Ray's precedence; None when there is none.

    ``auth_token_path`` (the spec's ``ray.auth_token_path``) stands in for ``RAY_AUTH_TOKEN_PATH``. A named
    file that is missing or empty is an error, as it is for Ray (no silent fall-back to another token).
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    named = [("ray.auth_token_path", auth_token_path), ("RAY_AUTH_TOKEN_PATH", os.environ.get("RAY_AUTH_TOKEN_PATH"))]
    for what, path in named:
        if not path:
            continue
        file = Path(path).expanduser()
        if not file.is_file():
            raise ClusterError(f"{what}: token file {file} not found")
        value = file.read_text(encoding="utf-8").strip()
        if not value:
            raise ClusterError(f"{what}: token file {file} is empty")
        return AuthToken(value, f"{what} ({file})")
    if DEFAULT_TOKEN_FILE.is_file():
        value = DEFAULT_TOKEN_FILE.read_text(encoding="utf-8").strip()
        if value:
            return AuthToken(value, str(DEFAULT_TOKEN_FILE))
    return None


def _auth_disabled() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled"


def use_token_auth(auth_token_path: str | None = None) -> AuthToken | None:
    """Make this process send the cluster token (Ray 2.60 needs RAY_AUTH_MODE=token for an explicit address).

    Returns the token used, or None (no token, or the user set RAY_AUTH_MODE=disabled: the cluster decides).
    Ray caches its config and token at first use, so both are refreshed after the environment changes.
    """
    if auth_token_path:
        file = Path(auth_token_path).expanduser()
        if not file.is_file():
            raise ClusterError(f"ray.auth_token_path: token file {file} not found")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(file)
    token = find_token(auth_token_path)
    if token is None or _auth_disabled():
        return None
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return token


def _gcs_target(address: str) -> str | None:
    """host:port of the GCS behind a ray.init address, or None where we cannot check it ourselves."""
    if "://" in address:  # ray:// goes through the Ray Client server, which has its own handshake
        return None
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            return canonicalize_bootstrap_address("auto")
        except Exception:  # noqa: BLE001 - no local cluster: ray.init reports it in its own words
            return None
    return address


def check_cluster(address: str, token: AuthToken | None, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Prove that the cluster at ``address`` is up and accepts ``token``, in one GCS call, before ray.init.

    Raises ClusterError (one line) when the cluster cannot be reached or refuses the token.
    """
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"Ray cluster {address}: that is a dashboard (job server) address; give the GCS "
                           f"address host:6379 here, or use `dpdistill submit SPEC --address {address}`")
    target = _gcs_target(address)
    if target is None or os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        return  # TLS or Ray Client: leave the handshake to ray.init
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token.value}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                if token is None:
                    raise ClusterError(f"Ray cluster {address} requires an auth token and none was found; "
                                       f"{TOKEN_HELP}") from None
                raise ClusterError(f"Ray cluster {address} refused the auth token from {token.source}; "
                                   f"{TOKEN_HELP}") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = (e.details() or str(code)).splitlines()[0]
                raise ClusterError(f"Ray cluster {address}: cannot reach its GCS ({detail}); is the head "
                                   "running and the port open?") from None
            # Anything else (an older GCS without this call, say): ray.init will tell.
            log.debug("cluster check of %s answered %s; leaving it to ray.init", address, code)


def connect_cluster(address: str | None = None, auth_token_path: str | None = None) -> str | None:
    """Resolve the cluster a job joins and prove it is reachable with our token; None means a local cluster.

    This is the preflight: cheap (one RPC), it reads no data, so the runner can call it before the first
    sensitive byte is read and a wrong address or token never costs a privacy budget.
    """
    address = cluster_address(address)
    if address is None:
        if auth_token_path:  # a token file named in the spec must exist even for a local run
            use_token_auth(auth_token_path)
        return None
    token = use_token_auth(auth_token_path)
    check_cluster(address, token)
    return address


class _DropOptOutBanner(logging.Filter):
    """Drops Ray's 'Set RAY_AUTH_MODE=disabled to opt out' banner; every other auth message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RAY_AUTH_MODE=disabled" not in record.getMessage()


def quiet_auth_banner() -> None:
    """Install the banner filter on Ray's auth logger (idempotent)."""
    logger = logging.getLogger(_BANNER_LOGGER)
    if not any(isinstance(f, _DropOptOutBanner) for f in logger.filters):
        logger.addFilter(_DropOptOutBanner())


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Put back a SIGTERM handler that ``ray.init`` replaces. ray.init installs its own (``sys.exit``) in the
    main thread; a caller that turned SIGTERM into an orderly stop (a run or study marked interrupted, not
    failed: ``runner.sigterm_interrupts``) would otherwise lose it for as long as Ray is up. Only a Python
    handler is put back: with none (SIG_DFL), Ray's exit (which runs the cleanup) is better than dying at once."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class RayOrHere:
    """Where work that can run either way runs: on Ray (``on_ray``), or in this process because Ray was not
    wanted or because a local Ray did not start (``not_started``, the one-line reason)."""

    on_ray: bool
    not_started: str | None = None


@contextlib.contextmanager
def ray_or_here(wanted: bool, address: str | None = None, num_cpus: int | None = None,
                auth_token_path: str | None = None, failed_before: str | None = None) -> Iterator[RayOrHere]:
    """A :func:`ray_session` for work that can also run in this process (evaluation models, generation chunks:
    the same seeds either way). A LOCAL Ray that fails to start is reported in the yielded value and
    the work runs here; a cluster the job names that cannot be reached still raises (that cluster was asked for).
    ``failed_before``: the reason an earlier local start of the same job failed; the work then runs here
    without a second try (another 30 s wait on a machine that was already too loaded).
    Work that cannot run without Ray (sweeps, Ray Train, actors) uses :func:`ray_session` itself."""
    if not wanted:
        yield RayOrHere(False)
        return
    if failed_before is not None:
        yield RayOrHere(False, failed_before)
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(ray_session(address, num_cpus, auth_token_path))
        except LocalRayStartError as e:
            not_started: str | None = str(e)
        else:
            not_started = None
        # Outside the except clause, so that an error in the body is not chained to the failed start. On Ray,
        # the body's exception goes to the session's exit (which shuts down a Ray it started) and is re-raised.
        yield RayOrHere(not_started is None, not_started)


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, auth_token_path: str | None = None
) -> Iterator[dict]:
    """Start (or join) Ray for the duration of a job; yields the cluster's resources.

    If Ray is already initialised in this process (tests, notebooks, a job that already connected) it is
    reused and left running. Joining an existing cluster (an address, or $RAY_ADDRESS in a Ray Job's driver)
    checks the address and token first and never passes ``num_cpus``.
    """
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    quiet_auth_banner()
    address = connect_cluster(address, auth_token_path)
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    with _keeping_sigterm_handler():
        if address:
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as e:
                raise ClusterError(f"Ray cluster {address}: cannot connect ({_first_line(e)})") from None
        else:
            try:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
                log.info("started a local Ray (%s CPUs) for this job", num_cpus or os.cpu_count() or 1)
            except BaseException as e:  # noqa: BLE001 - Ray raises a bare Exception for its node-start timeout
                # Nothing of the failed start may outlive it: neither a node ray.init dropped (found in the
                # traceback) nor one it kept (a failure after the node came up: ray.shutdown stops it).
                _stop_half_started_node(e)
                ray.shutdown()
                if not isinstance(e, Exception):  # Ctrl-C / SIGTERM while starting: cleaned up, re-raised
                    raise
                log.debug("local ray.init failed", exc_info=True)
                raise LocalRayStartError(f"local Ray did not start ({_first_line(e)})") from e
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
