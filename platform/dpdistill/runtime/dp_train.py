"""Where DP-SGD runs: in this process, or sharded over Ray Train workers (``TorchTrainer``, gloo or nccl).

The driver has charged the schedule to its ledger before :func:`fit_dp_sgd` is called; nothing here sees a
ledger, and a resumed fit continues the charged schedule (it never asks for more steps than it holds).

``ray-train``: the sensitive set is permuted with the privacy source and cut into ``num_workers`` contiguous
shards on the driver; each shard travels as an object-store ref in ``train_loop_config`` (not Ray Data and not
``prepare_data_loader``: both would change the sampling; each worker Poisson-samples its own shard at the GLOBAL
rate q, which is exactly Poisson sampling of the whole set). Each worker gets its own child privacy source
(``noise.spawn("worker-<rank>")``: independent secret streams) and runs
:func:`dpdistill.training.dp_sgd.train_dp_sgd` with ``rank``/``world_size``; the clipped sums are all-reduced and
rank 0 adds the step's noise once. Rank 0 writes a checkpoint (network, optimiser state, step, schedule, the
weights' moving average) every ``checkpoint_every`` steps through ``ray.train.report``; a worker that fails is
restarted by Ray Train (``FailureConfig.max_failures``) and every worker resumes from ``ray.train.get_checkpoint()`` at its step, with
a fresh child source for the rest of the run. Reports carry the step number only. The final state returns to
the driver as the run's last checkpoint; checkpoint folders a failed attempt uploaded but Ray never registered are
then removed (:func:`drop_unregistered_checkpoints`: they would be a second, uncharged continuation).

Storage: ``storage_path`` (shared by every node of a multi-node cluster) holds the run ``run_name``; a fit with
the same storage path and name resumes that run, as Ray Train V2 does. Without a storage path the run goes to a
temporary folder removed afterwards (no resumption across calls). ``in-process`` with a storage path keeps one
checkpoint file there and resumes from it the same way. Both record the finished run as its last checkpoint, so
calling again with the same storage and name returns the same release rather than training (and releasing) a
second model from the last checkpoint on.

Threads: each worker pins torch to the job's ``threads`` ($DPDISTILL_THREADS) or 1 and reserves that many CPUs;
``use_gpu`` reserves one GPU per worker and trains on it (nccl).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpdistill.errors import ClusterError, PrivacyError, SpecError
from dpdistill.privacy.noise import PrivacyRandomness
from dpdistill.training.dp_sgd import (
    DPObjective,
    DPSGDSchedule,
    objective_device,
    progress_printer,
    train_dp_sgd,
)

log = logging.getLogger("dpdistill.dp_train")

EXECUTORS = ("in-process", "ray-train")
STATE_FILE = "state.pt"


def _threads() -> int:
    from dpdistill.evaluation.training import THREADS_ENV

    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value else 1


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_train_capacity(nodes: list[dict[str, float]], num_workers: int, use_gpu: bool,
                         field: str = "method.train_workers") -> None:
    """Refuse (one-line SpecError naming ``field``) a Ray Train fit the cluster cannot place: each worker
    reserves ``threads`` CPUs and, with ``use_gpu``, one GPU, all on ONE node. Ray Train would otherwise wait
    for them forever, after the plan was charged; call this with :func:`cluster_nodes` BEFORE charging.

    Each node's totals, not what is free now: a busy cluster frees resources, a too-small one never does; and
    a worker cannot span nodes (8 CPUs on a CPU node and 2 GPUs on a 2-CPU node hold no 4-CPU GPU worker). An
    autoscaling cluster that could grow to fit is refused too: keep that many workers up while the fit runs.
    """
    threads = _threads()
    placement_retries()  # a bad $DPDISTILL_TRAIN_PLACEMENT_RETRIES is refused here, before the plan is charged
    require_train_v2()

    def holds(node: dict[str, float]) -> int:
        fit = int(float(node.get("CPU", 0.0)) // threads)
        return min(fit, int(float(node.get("GPU", 0.0)))) if use_gpu else fit

    placeable = sum(holds(n) for n in nodes)
    if placeable < num_workers:
        shown = "; ".join(", ".join(f"{float(n.get(k, 0.0)):g} {k}" for k in ("CPU", "GPU")) for n in nodes)
        raise SpecError(f"field '{field}': {num_workers} Ray Train workers need {threads} CPU"
                        f"{' and 1 GPU' if use_gpu else ''} each on one node, but the Ray cluster's nodes "
                        f"({shown or 'none'}) hold {placeable}; use fewer workers or a larger cluster")


def _check_resumable(saved: dict[str, Any], schedule: DPSGDSchedule, where: str) -> int:
    """The step a checkpoint resumes from, after checking it belongs to this schedule (a checkpoint written before
    a schedule field existed is read with that field at its default)."""
    try:
        written = DPSGDSchedule(**saved["schedule"]).to_dict()
    except (KeyError, TypeError, SpecError):
        written = saved.get("schedule")
    if written != schedule.to_dict():
        raise PrivacyError(f"dp-sgd: the checkpoint in {where} was written for another schedule "
                           f"({saved.get('schedule')}); refusing to resume it under {schedule.to_dict()}")
    step = int(saved["step"])
    if not 0 <= step <= schedule.steps:
        raise PrivacyError(f"dp-sgd: the checkpoint in {where} is at step {step}, outside 0..{schedule.steps}")
    return step


def _progress_printer(enabled: bool, steps: int, rank: int = 0) -> Callable[[int, dict], None] | None:
    return progress_printer(steps) if enabled and rank == 0 else None


def _chain(*hooks: Callable[[int, dict], None] | None) -> Callable[[int, dict], None] | None:
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def call(step: int, info: dict) -> None:
        for h in live:
            h(step, info)

    return call


# ------------------------------------------------------------------------------------------------- in-process


def _fit_in_process(objective: DPObjective, initial_state: dict | None, images: torch.Tensor, labels: torch.Tensor,
                    schedule: DPSGDSchedule, noise: PrivacyRandomness, storage_path: Path | None, run_name: str,
                    progress: bool, on_step: Callable[[int, dict], None] | None) -> dict[str, torch.Tensor]:
    start, optimizer_state, ema_state, on_checkpoint = 0, None, None, None
    if storage_path is not None:
        folder = Path(storage_path) / run_name
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / STATE_FILE
        if file.is_file():
            saved = torch.load(file, weights_only=True)
            start = _check_resumable(saved, schedule, str(file))
            initial_state, optimizer_state, ema_state = saved["net"], saved["optimizer"], saved.get("ema")
            # The interrupted run's draws are spent; the rest of the run gets a stream of its own.
            noise = noise.spawn(f"resume-{start}")
            if start == schedule.steps:
                return saved["net"]

        def on_checkpoint(step: int, state: dict) -> None:
            tmp = file.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, file)  # atomic: a crash mid-write leaves the previous checkpoint

    hook = _chain(on_step, _progress_printer(progress, schedule.steps))
    final = train_dp_sgd(objective, initial_state, images, labels, schedule, noise, start_step=start,
                         optimizer_state=optimizer_state, ema_state=ema_state, on_checkpoint=on_checkpoint,
                         on_step=hook)
    if on_checkpoint is not None and not (schedule.checkpoint_every
                                          and schedule.steps % schedule.checkpoint_every == 0):
        # The finished run is recorded too: calling again returns this release instead of redoing the steps
        # after the last checkpoint (which would release a second, differently noised model).
        on_checkpoint(schedule.steps, {"step": schedule.steps, "net": final, "optimizer": {},
                                       "schedule": schedule.to_dict()})
    return final


# ------------------------------------------------------------------------------------------------- Ray Train


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard, its privacy stream, DP-SGD with rank/world size, checkpoints on rank 0."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    schedule: DPSGDSchedule = config["schedule"]
    noise: PrivacyRandomness = config["noise"][rank]
    images, labels = ray.get(config["shards"][rank])
    initial_state = ray.get(config["initial_state"]) if config["initial_state"] is not None else None
    device = None
    if config["use_gpu"]:
        import ray.train.torch

        device = ray.train.torch.get_device()

    start, optimizer_state, ema_state = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, weights_only=True)
        start = _check_resumable(saved, schedule, "the Ray Train run's latest checkpoint")
        initial_state, optimizer_state, ema_state = saved["net"], saved["optimizer"], saved.get("ema")
        noise = noise.spawn(f"resume-{start}")
        if start == schedule.steps:
            return  # the final state is already the run's latest checkpoint

    reported = {"step": start}

    def report(step: int, state: dict | None) -> None:
        # Every worker reports (Ray Train synchronises on it); only rank 0 attaches the files.
        reported["step"] = step
        if rank != 0 or state is None:
            ray.train.report({"step": step}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))

    hook = _chain(config["on_step"], _progress_printer(config["progress"], schedule.steps, rank))
    final = train_dp_sgd(config["objective"], initial_state, images, labels, schedule, noise, rank=rank,
                         world_size=world, start_step=start, optimizer_state=optimizer_state,
                         ema_state=ema_state, device=device,
                         on_checkpoint=report, on_step=hook)
    if reported["step"] != schedule.steps:  # the last step was not a checkpoint step: report the final state
        state = {"step": schedule.steps, "net": final, "optimizer": {}, "schedule": schedule.to_dict()}
        report(schedule.steps, state)


def shard_indices(n: int, num_workers: int, noise: PrivacyRandomness) -> list[torch.Tensor]:
    """``num_workers`` contiguous pieces of a private permutation of range(n) (which record is where is secret)."""
    if num_workers > n:
        raise SpecError(f"dp-sgd: {num_workers} workers for {n} records; use at most one worker per record")
    return list(torch.tensor_split(noise.permutation(n), num_workers))


# How many times Ray Train may fail to start the worker group before the fit fails; each attempt waits Ray's
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default). Ray Train V2 retries a start that times out without
# limit, so a fit whose workers cannot be placed (capacity is checked before charging, but a cluster can be
# busy for good or lose a node) would hang forever with its plan charged. Ten retries (eleven starts): ~11 minutes
# by default.
PLACEMENT_RETRIES_ENV = "DPDISTILL_TRAIN_PLACEMENT_RETRIES"
DEFAULT_PLACEMENT_RETRIES = 10


def placement_retries() -> int:
    """The worker-group start attempts Ray Train may retry (``$DPDISTILL_TRAIN_PLACEMENT_RETRIES``, default 10)."""
    value = os.environ.get(PLACEMENT_RETRIES_ENV, "").strip()
    try:
        retries = int(value) if value else DEFAULT_PLACEMENT_RETRIES
    except ValueError:
        raise SpecError(f"${PLACEMENT_RETRIES_ENV}: expected a whole number of retries, got {value!r}") from None
    if retries < 0:
        raise SpecError(f"${PLACEMENT_RETRIES_ENV}: expected 0 or more retries, got {retries}")
    return retries


def require_train_v2() -> None:
    """Refuse (one-line SpecError) a fit under Ray Train V1 (``RAY_TRAIN_V2_ENABLED=0``): the bounded placement
    retries are V2's ``FailureConfig(controller_failure_limit=…)``, which V1 lacks, so the fit would fail after
    the plan was charged. Ray 2.60's default is V2."""
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise SpecError(f"Ray Train V2 is required (the DP fit bounds its worker-placement retries with V2's "
                        f"FailureConfig); unset ${V2_ENABLED_ENV_VAR} or set it to 1")


def _startup_failure(err: BaseException) -> BaseException | None:
    """The worker-group start failure behind a Ray Train error (the placement retries ran out), or None."""
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
    )

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for candidate in (err, getattr(err, "controller_failure", None)):
            if isinstance(candidate, (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError)):
                return candidate
        err = err.__cause__ or err.__context__
    return None


def _fit_ray_train(objective: DPObjective, initial_state: dict | None, images: torch.Tensor, labels: torch.Tensor,
                   schedule: DPSGDSchedule, noise: PrivacyRandomness, num_workers: int, use_gpu: bool,
                   storage_path: Path | None, run_name: str, progress: bool, max_failures: int,
                   on_step: Callable[[int, dict], None] | None) -> dict[str, torch.Tensor]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dpdistill.runtime.cluster import ray_session

    threads = _threads()
    scratch = None
    if storage_path is None:
        scratch = Path(tempfile.mkdtemp(prefix="dpsgd-"))
    storage = Path(storage_path if storage_path is not None else scratch).resolve()
    try:
        with ray_session(num_cpus=max(num_workers * threads, os.cpu_count() or 1)):
            # The caller should have checked before charging; a fit that cannot be placed must not hang.
            check_train_capacity(cluster_nodes(), num_workers, use_gpu, field="dp-sgd num_workers")
            shards = [ray.put((images[idx].contiguous(), labels[idx].contiguous()))
                      for idx in shard_indices(len(images), num_workers, noise)]
            config = {
                "objective": objective, "schedule": schedule, "threads": threads, "use_gpu": use_gpu,
                "shards": shards, "noise": [noise.spawn(f"worker-{r}") for r in range(num_workers)],
                "initial_state": ray.put(initial_state) if initial_state is not None else None,
                "on_step": on_step, "progress": progress,
            }
            trainer = TorchTrainer(
                _train_worker, train_loop_config=config,
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                             resources_per_worker={"CPU": threads, **({"GPU": 1} if use_gpu else {})}),
                run_config=RunConfig(name=run_name, storage_path=str(storage),
                                     failure_config=FailureConfig(max_failures=max_failures,
                                                                  controller_failure_limit=placement_retries()),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)),
            )
            try:
                result = trainer.fit()
            except Exception as e:
                failure = _startup_failure(e)
                if failure is None:
                    raise
                # Ray's own line last: a start can also fail on a broken runtime environment or import.
                why = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
                raise ClusterError(
                    f"dp-sgd: Ray Train could not start {num_workers} worker(s) of {threads} CPU"
                    f"{' and 1 GPU' if use_gpu else ''} in {placement_retries() + 1} attempt(s) (each waits "
                    "$RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default; the plan stays charged); free "
                    f"the cluster or raise ${PLACEMENT_RETRIES_ENV}. Ray: {why}") from None
            if result.checkpoint is None:
                raise PrivacyError(f"dp-sgd: Ray Train run {run_name} ended without a final checkpoint")
            with result.checkpoint.as_directory() as d:
                saved = torch.load(Path(d) / STATE_FILE, weights_only=True)
            drop_unregistered_checkpoints(storage / run_name, result)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if int(saved["step"]) != schedule.steps:
        raise PrivacyError(f"dp-sgd: Ray Train run {run_name} ended at step {saved['step']} of {schedule.steps}")
    return saved["net"]


def drop_unregistered_checkpoints(run_dir: Path, result: Any) -> list[Path]:
    """Remove the checkpoint folders under ``run_dir`` that Ray Train did not register for ``result``.

    Rank 0 uploads a checkpoint after every worker has reached the report, but Ray registers it only once every
    worker's report arrives. A worker (or the driver) that dies in between leaves an uploaded folder the run
    never registered; the restarted workers resume from the last REGISTERED step and train that stretch again
    with fresh noise. The orphan is then a second, differently noised continuation of steps the ledger charged
    once: leaving it in the run folder would release more than was charged. The registered checkpoints
    (``result.best_checkpoints``, the last ``num_to_keep``) are one lineage of the charged run and stay."""
    keep = {Path(c.path).resolve() for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        keep.add(Path(result.checkpoint.path).resolve())
    dropped = []
    for folder in sorted(Path(run_dir).glob("checkpoint_*")):
        if folder.is_dir() and folder.resolve() not in keep:
            shutil.rmtree(folder)
            dropped.append(folder)
    if dropped:
        log.warning("dp-sgd: removed %d checkpoint folder(s) of a failed attempt that Ray Train never registered "
                    "(a second continuation of charged steps): %s", len(dropped),
                    ", ".join(f.name for f in dropped))
    return dropped


def fit_dp_sgd(objective: DPObjective, initial_state: dict[str, torch.Tensor] | None, images: torch.Tensor,
               labels: torch.Tensor, schedule: DPSGDSchedule, noise: PrivacyRandomness, *, num_workers: int = 1,
               use_gpu: bool = False, executor: str = "in-process", storage_path: Path | None = None,
               run_name: str = "dp-sgd", progress: bool = False, max_failures: int = 2,
               on_step: Callable[[int, dict], None] | None = None) -> dict[str, torch.Tensor]:
    """Train ``objective`` with DP-SGD on the whole sensitive set under an already-charged ``schedule``.

    ``executor``: ``in-process`` (this process, world size 1) or ``ray-train`` (``num_workers`` Ray Train
    workers, ``use_gpu`` for one GPU each). ``max_failures``: how many worker failures Ray Train recovers from
    (from the latest checkpoint). ``on_step(step, info)`` (picklable for ray-train) runs after every step on
    every worker, with public information only (step, steps, rank, elapsed_s). Returns the final state_dict.
    """
    if executor not in EXECUTORS:
        raise SpecError(f"dp-sgd: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if len(images) != schedule.n_records:
        raise PrivacyError(f"dp-sgd: the schedule was planned for n_records={schedule.n_records} but the data "
                           f"holds {len(images)} records")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise SpecError(f"dp-sgd: num_workers must be a positive integer, got {num_workers!r}")
    if executor == "ray-train" and not use_gpu and objective_device(objective).type == "cuda":
        raise SpecError("dp-sgd: the objective trains on cuda but the Ray Train workers reserve no GPU; pass "
                        "use_gpu=True (one GPU per worker)")
    if executor == "in-process":
        if num_workers != 1 or use_gpu:
            raise SpecError("dp-sgd: the in-process executor runs one worker on the objective's device; use "
                            "executor: ray-train for num_workers > 1 or use_gpu")
        return _fit_in_process(objective, initial_state, images, labels, schedule, noise, storage_path, run_name,
                               progress, on_step)
    return _fit_ray_train(objective, initial_state, images, labels, schedule, noise, num_workers, use_gpu,
                          storage_path, run_name, progress, max_failures, on_step)
