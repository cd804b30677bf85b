"""Job kind ``sfdd``: Secure Federated Data Distillation across simulated data owners on Ray actors.

Stages: load + partition (prepare) → federated distillation (server on the driver, clients in a bounded Ray
actor pool; per-round metrics and, every ``eval_every`` rounds, a quick accuracy to MLflow) → release
(distilled set, grid, per-round history, accuracy-by-round plot) → evaluate (fresh models on the real test
split) → attack (optional: DLG/iDLG by the server on client 0, or Doorping's success rate).

Privacy: only ``defence: localdp`` makes SFDD differentially private (and then needs ``privacy.epsilon``); the
ledger gets one parallel charge per dispatch (see :mod:`dpdistill.federated.protocol`) and the per-client ε
goes to ``artifacts/client_privacy.json`` with the neighbouring relation: add-or-remove-one record, each
record's client a keyed hash of that record alone (:mod:`dpdistill.data.partition`). Each client actor draws
its noise and sampling from its own secret source (``ctx.noise`` reaches the actors only in the NOT PRIVATE
debugging mode). Only released and aggregate outputs are written: never a client's records, never an attack's
reconstructions, and in a private run nothing a client computed from its records without noise (local losses,
client compute times) and no attack study (its numbers are measured on the clients' real records). Every key a
private run writes is declared in :data:`DISCLOSURE` (``tests/test_disclosure_sfdd.py`` enforces it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from dpdistill.errors import PrivacyError, SpecError
from dpdistill.evaluation.selection import DISCLOSURE as EVALUATION_DISCLOSURE
from dpdistill.privacy.disclosure import ACCOUNTING, EVALUATION, PUBLIC

log = logging.getLogger("dpdistill.pipelines.sfdd")

METHODS = ("sfdd",)

# What a private (LocalDP) SFDD run writes beyond the common keys: MLflow metrics (per round and final),
# metrics.json, MLflow params, and the keys of the JSON files under artifacts/. Nothing a client computed from
# its records without noise is here: under LocalDP clients withhold their loss, size, class counts and time.
DISCLOSURE: dict[str, str] = {
    **EVALUATION_DISCLOSURE,  # the evaluation protocol's selection and per-model rows
    # MLflow params: the resolved spec, public by construction.
    "name": PUBLIC, "kind": PUBLIC, "description": PUBLIC, "seed": PUBLIC, "device": PUBLIC, "threads": PUBLIC, "compile": PUBLIC,
    "data.*": PUBLIC,
    "method.*": PUBLIC, "privacy.*": PUBLIC, "evaluation.*": PUBLIC, "ray.*": PUBLIC, "resources.*": PUBLIC,
    "tracking.*": PUBLIC,
    # Per-round MLflow metrics: which clients answered (actor failures). Not the round's wall time: it is the
    # slowest client's compute time on its records, which LocalDP clients withhold.
    "clients_answered": PUBLIC, "clients_dropped": PUBLIC, "round_attempts": PUBLIC,
    # The current release scored on the test split (eval_every), and the final summary figures.
    "acc": EVALUATION, "ipc": PUBLIC, "clients_dropped_total": PUBLIC, "epsilon_client_max": ACCOUNTING,
    # rounds.json
    "round": PUBLIC, "sampled": PUBLIC, "answered": PUBLIC, "dropped": PUBLIC, "client": PUBLIC,
    "reason": PUBLIC, "attempts": PUBLIC,
    # client_privacy.json (accuracy_by_round.json has round and acc)
    "delta": ACCOUNTING, "neighbouring": PUBLIC, "partition": PUBLIC, "composition": PUBLIC, "noise": PUBLIC,
    "clients": PUBLIC, "dispatches": ACCOUNTING, "epsilon": ACCOUNTING,
}


IMAGE_ARTIFACTS = ("distilled_grid.png",)  # kept out of MLflow when the release is not private


def not_private_release(defence: str) -> str:
    """The line that marks an SFDD release without LocalDP (run folder, summary, status, MLflow)."""
    return (f"NOT PRIVATE: SFDD with defence '{defence}' gives no differential-privacy guarantee; the distilled "
            "set is built from clients' updates computed on real records without noise and may reproduce them "
            "(method.defence: localdp with privacy.epsilon makes it private)")


@dataclass
class PreparedSFDD:
    """Loaded inputs of an SFDD job (kept in memory only)."""

    train: Any  # data.ImageSet, sensitive: the union of the clients' partitions
    val: Any  # data.ImageSet, scored only
    test: Any  # data.ImageSet, evaluation only
    info: Any  # data.DatasetInfo
    config: Any  # SFDDConfig
    partition: Any  # data.partition.Partition over train
    public: Any | None  # public ImageSet for init: public

    @property
    def n_sensitive(self) -> int:
        return len(self.train)


def make_config(options: dict[str, Any], source: str = "<spec>") -> Any:
    """The SFDDConfig from a spec's method options; a bad option is a one-line SpecError."""
    from dpdistill.federated.config import SFDDConfig

    try:
        return SFDDConfig(**options)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "?"
        where = f"field 'method.{loc}'" if loc != "?" else "method"
        raise SpecError(f"{source}: {where}: {first.get('msg')}") from None


class SFDDPipeline:
    """The ``sfdd`` job kind."""

    kind = "sfdd"

    def method_config(self, method: str, source: str) -> Any:
        from dpdistill.federated.config import SFDDConfig

        if method not in METHODS:
            raise SpecError(f"{source}: field 'method.name': unknown SFDD method '{method}'; expected one of: "
                            f"{', '.join(METHODS)}")
        return SFDDConfig

    def prepare(self, spec: Any) -> PreparedSFDD:
        from dpdistill import data, models
        from dpdistill.evaluation.selection import check_plan
        from dpdistill.pipelines import check_evaluation_model, check_public_source
        from dpdistill.pipelines.distill_job import load_splits
        from dpdistill.runtime.device import check_device

        # Checked in this process, where the clients' device is resolved (see runtime.device), before any data
        # is read.
        check_device(spec.device)
        self.method_config(spec.method.name, "<spec>")
        cfg = make_config(spec.method.options())
        if cfg.defence == "localdp" and spec.privacy.epsilon is None:
            raise SpecError("privacy.epsilon: method.defence localdp releases DP updates and needs a budget")
        if cfg.defence != "localdp" and spec.privacy.epsilon is not None:
            raise SpecError(f"privacy.epsilon: SFDD with defence '{cfg.defence}' gives no DP guarantee; remove "
                            "privacy.epsilon or set method.defence: localdp")
        if cfg.defence == "localdp" and cfg.attack != "none":
            # DLG's reconstruction error and Doorping's trigger are computed from clients' real records without
            # noise: an attack study is not a private release.
            raise SpecError(f"method.attack: {cfg.attack} measures the attack on the clients' real records, which "
                            "a private (localdp) run may not release; run the attack study with defence none or "
                            "ldpo-rld, without privacy.epsilon")
        if spec.evaluation.model not in models.names():
            raise SpecError(f"field 'evaluation.model': unknown model '{spec.evaluation.model}'; "
                            f"expected one of: {', '.join(models.names())}")
        train, val, test, info = load_splits(spec)
        check_evaluation_model(spec, train.channels, info.num_classes, train.image_size)
        check_plan(spec, train.channels, info.num_classes, train.image_size)
        if cfg.attack == "doorping":
            if cfg.target_class >= info.num_classes:
                raise SpecError(f"field 'method.target_class': {cfg.target_class} is not a class of {info.name} "
                                f"(0..{info.num_classes - 1})")
            if cfg.trigger_size >= train.image_size:
                raise SpecError(f"field 'method.trigger_size': {cfg.trigger_size} px does not fit "
                                f"{train.image_size}x{train.image_size} images")
        opts: dict[str, Any] = {"num_classes": info.num_classes}
        if cfg.partition == "dirichlet":
            opts["alpha"] = cfg.dirichlet_alpha
            opts["min_size"] = min(10, len(train) // cfg.n_clients)
        # A record's client is a keyed hash of the record (key: the public seed), so removing one record changes
        # one client's data: the basis of the per-round parallel LocalDP charge.
        partition = data.partition.make_partition(cfg.partition, train.labels, cfg.n_clients, seed=spec.seed,
                                                  images=train.images, **opts)
        public = None
        if cfg.init == "public":
            check_public_source(cfg.public_data, spec, "method.public_data")
            public = data.load(cfg.public_data, "train", root=spec.data.root, image_size=train.image_size)
            if public.channels != train.channels or public.num_classes != info.num_classes:
                raise SpecError(f"field 'method.public_data': '{cfg.public_data}' has {public.channels} channels and "
                                f"{public.num_classes} classes; {info.name} needs {train.channels} and "
                                f"{info.num_classes}")
        if cfg.defence == "localdp":
            _check_localdp_budget(spec, cfg, len(train))
        return PreparedSFDD(train, val, test, info, cfg, partition, public)

    def execute(self, ctx: Any, p: PreparedSFDD) -> dict[str, Any]:
        from dpdistill.runtime.cluster import ray_session

        spec = ctx.spec
        # One Ray session for the rounds and the evaluation (report_utility reuses it): starting Ray costs
        # seconds, and the actors' CPUs are free again once the pool is shut down.
        with ray_session(spec.ray.address, spec.ray.num_cpus, spec.ray.auth_token_path):
            return self._execute(ctx, p)

    def _execute(self, ctx: Any, p: PreparedSFDD) -> dict[str, Any]:
        from dpdistill.distill.dm import progress_steps
        from dpdistill.evaluation.grids import save_class_grid
        from dpdistill.evaluation.selection import charge_selection
        from dpdistill.federated import ClientContext, initial_set, run_sfdd
        from dpdistill.runtime.client_pool import ActorPool
        from dpdistill.runtime.device import record_device, resolve_device

        spec, cfg, art = ctx.spec, p.config, ctx.run.artifacts
        device = resolve_device(spec.device)
        record_device(ctx, device)
        if cfg.defence != "localdp":
            from dpdistill.pipelines.not_private import mark_release_not_private

            mark_release_not_private(ctx, not_private_release(cfg.defence), IMAGE_ARTIFACTS)
        mean, std = list(p.info.mean), list(p.info.std)  # published constants, never the clients' statistics
        init = initial_set(cfg, p.info.num_classes, (p.train.channels, p.train.image_size, p.train.image_size),
                           spec.seed, mean=mean, std=std, public=p.public)
        curve: list[tuple[int, float]] = []
        # Under LocalDP the clients withhold their compute time, and a round's end time would give away the
        # slowest one's: per-round figures are kept back and logged once the rounds are over (MLflow and
        # log.txt then carry no per-round timestamps).
        withhold_time = cfg.defence == "localdp"
        held: list[tuple[int, dict[str, float]]] = []
        with progress_steps(cfg.rounds, "SFDD", ctx.progress) as advance:

            def on_round(record: Any, syn: Any) -> None:
                metrics = record.metrics()
                last = record.round == cfg.rounds - 1
                if cfg.eval_every and ((record.round + 1) % cfg.eval_every == 0 or last):
                    metrics["acc"] = quick_accuracy(spec, p, syn, cfg.eval_epochs)
                    curve.append((record.round + 1, metrics["acc"]))
                if withhold_time:
                    held.append((record.round, metrics))
                else:
                    ctx.log_metrics(metrics, step=record.round)
                    log.info("round %d: %d answered, %d dropped, %.1f s%s", record.round, len(record.answered),
                             len(record.dropped), record.seconds,
                             f", acc {100 * metrics['acc']:.2f} %" if "acc" in metrics else "")
                advance(record.loss)

            # ctx.noise reaches the actors only when it is reproducible (NOT PRIVATE); a secret one is not sent
            # and each actor creates its own.
            pool = ActorPool(p.train, p.partition, ClientContext(cfg, mean, std, str(device)), cfg.pool_size,
                             cfg.actor_cpus, noise=ctx.noise.spawn("sfdd-clients"))
            # A noisy-senv selection is paid out of the job's ε: charged before the first round's release.
            charge_selection(spec.evaluation, ctx.ledger)
            try:
                with ctx.stage(f"federated distillation ({cfg.rounds} rounds)"):
                    result = run_sfdd(pool, init, cfg, seed=spec.seed, ledger=ctx.ledger, callback=on_round)
            finally:
                pool.shutdown()
                for step, metrics in held:  # LocalDP: after the rounds, with no per-round timing
                    ctx.log_metrics(metrics, step=step)
                if held:
                    log.info("%d rounds logged after the rounds (LocalDP: no per-round timing)", len(held))
        images, labels = result.synthetic.export()
        torch.save({"images": images, "labels": labels, "num_classes": p.info.num_classes, "dataset": p.info.name,
                    "method": "sfdd", "clients": cfg.n_clients, "rounds": cfg.rounds}, art / "distilled.pt")
        save_class_grid(images, labels, art / "distilled_grid.png", num_classes=p.info.num_classes,
                        per_class=min(10, max(1, len(labels) // p.info.num_classes)))
        (art / "rounds.json").write_text(json.dumps([r.to_json() for r in result.history], indent=2) + "\n")
        dropped = sum(len(r.dropped) for r in result.history)
        ctx.add_summary("made", f"{len(labels)} distilled images ({len(labels) // p.info.num_classes}/class) of "
                        f"{p.info.name} by SFDD: {cfg.n_clients} clients, {cfg.rounds} rounds, defence "
                        f"{cfg.defence}" + (f", {dropped} client answers dropped" if dropped else ""))
        ctx.log_metrics({"ipc": float(len(labels) // p.info.num_classes), "n_released": float(len(labels)),
                         "clients_dropped_total": float(dropped)})
        if cfg.defence == "localdp":
            report_client_privacy(ctx, result, cfg)
        if spec.evaluation.enabled:
            from dpdistill.pipelines.distill_job import report_utility

            acc = report_utility(ctx, images, labels, p)
            if not curve or curve[-1][0] != cfg.rounds:
                curve.append((cfg.rounds, acc["test"]["mean"]))
        if curve:
            plot_accuracy(curve, art / "accuracy_by_round.png", f"SFDD on {p.info.name}, {cfg.n_clients} clients")
            (art / "accuracy_by_round.json").write_text(
                json.dumps([{"round": r, "acc": a} for r, a in curve], indent=2) + "\n")
        if cfg.attack in ("dlg", "idlg"):
            with ctx.stage(f"attack ({cfg.attack})"):
                run_inversion_attack(ctx, p)
        elif cfg.attack == "doorping":
            with ctx.stage("attack (doorping)"):
                run_doorping_eval(ctx, p, result, images, labels)
        return {}


def _check_localdp_budget(spec: Any, cfg: Any, n: int) -> None:
    """Refuse, before any work, a LocalDP schedule whose rounds alone (no retries) exceed the budget, with a
    noisy-senv evaluation selection (charged out of the same budget) counted in."""
    from dpdistill.evaluation.selection import selection_mechanism
    from dpdistill.federated.defences import LocalDP
    from dpdistill.privacy.accountant import epsilon
    from dpdistill.privacy.defaults import default_delta
    from dpdistill.privacy.mechanisms import Composed, Gaussian

    delta = spec.privacy.delta if spec.privacy.delta is not None else default_delta(n)
    base = LocalDP(cfg.localdp_sigma, cfg.localdp_clip).mechanism()
    rounds = Gaussian(base.sigma, base.sensitivity, count=cfg.rounds)
    selecting = spec.evaluation.enabled and spec.evaluation.selection == "noisy-senv"
    eps = epsilon(Composed((selection_mechanism(spec.evaluation), rounds)) if selecting else rounds, delta)
    if eps > spec.privacy.epsilon:
        plus = f" and the noisy-senv selection (ε {spec.evaluation.selection_epsilon:g})" if selecting else ""
        raise PrivacyError(f"privacy.epsilon: {cfg.rounds} rounds of LocalDP (sigma={cfg.localdp_sigma:g}, "
                           f"clip={cfg.localdp_clip:g}){plus} cost ε={eps:.3g} > budget {spec.privacy.epsilon:g} "
                           f"at δ={delta:.3g}; raise method.localdp_sigma or lower method.rounds")


def quick_accuracy(spec: Any, p: PreparedSFDD, syn: Any, epochs: int) -> float:
    """One model, one seed, trained on the current set: the accuracy-by-round curve (cheaper than the final)."""
    from dpdistill.evaluation.utility import evaluate_utility
    from dpdistill.runtime.device import resolve_device

    images, labels = syn.export()
    ev = spec.evaluation
    r = evaluate_utility(images, labels, p.test.images, p.test.labels, num_classes=p.info.num_classes,
                         model=ev.model, model_kwargs=dict(ev.model_options), seeds=(spec.seed,), epochs=epochs,
                         batch_size=ev.batch_size, lr=ev.lr, augment=ev.augmentation(), mean=tuple(p.info.mean),
                         std=tuple(p.info.std), device=resolve_device(spec.device), progress=False)
    return float(r.mean)


def plot_accuracy(curve: list[tuple[int, float]], path: Any, title: str) -> None:
    """Test accuracy (%) against rounds completed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs, ys = zip(*curve, strict=True)
    ax.plot(xs, [100 * y for y in ys], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_client_privacy(ctx: Any, result: Any, cfg: Any) -> None:
    """Per-client LocalDP ε (how often each was dispatched) and the neighbouring relation to the artifacts."""
    from dpdistill.data.partition import RELATION
    from dpdistill.federated import LocalDP, client_epsilons

    delta = ctx.ledger.delta
    eps = client_epsilons(result.dispatches, LocalDP(cfg.localdp_sigma, cfg.localdp_clip), delta)
    noise = getattr(ctx, "noise", None)
    doc = {"delta": delta, "neighbouring": RELATION,
           "partition": f"{cfg.partition} over {cfg.n_clients} clients",
           "composition": "clients hold disjoint partitions and one record reaches one client: each round's "
                          "releases compose in parallel, rounds sequentially; the job's ε is the max over clients",
           "noise": ("each client's own secret source (OS entropy in its actor); nothing the server sends "
                     "determines it" if noise is None or noise.private else
                     "NOT PRIVATE: reproducible, derived from spec.seed (privacy.reproducible_noise)"),
           "clients": [{"client": c, "dispatches": result.dispatches[c], "epsilon": e} for c, e in eps.items()]}
    (ctx.run.artifacts / "client_privacy.json").write_text(json.dumps(doc, indent=2) + "\n")
    worst = max(eps.values()) if eps else 0.0
    ctx.log_metrics({"epsilon_client_max": worst})
    ctx.add_summary("LocalDP", f"ε ≤ {worst:.3g} per client at δ={delta:.3g} (max over {len(eps)} clients; "
                    f"ledger total {ctx.ledger.spent_epsilon():.3g})")
    ctx.add_summary("neighbouring", f"add-or-remove-one record; a record's client is a keyed hash of that record "
                    f"alone ({cfg.partition} partition), so one record changes one client's data")


def run_inversion_attack(ctx: Any, p: PreparedSFDD) -> None:
    """The curious server's DLG/iDLG on client 0's records, with the job's defence and without it.

    Never in a private run (``prepare`` refuses it): the reconstruction error is measured on real records.
    """
    from dpdistill.federated.attacks.dlg import attack_records
    from dpdistill.federated.defences import ldpo_rld_soft_labels

    cfg, spec = p.config, ctx.spec
    idx = p.partition.indices[0][: cfg.attack_targets]
    victim = p.train.subset(idx)
    common = dict(num_classes=p.info.num_classes, mean=list(p.info.mean), std=list(p.info.std), method=cfg.attack,
                  model=cfg.attack_model, iterations=cfg.attack_iterations, seed=spec.seed)
    label_fn = None
    if cfg.defence == "ldpo-rld":
        def label_fn(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return ldpo_rld_soft_labels(y, p.info.num_classes, cfg.ldpo_alpha, cfg.ldpo_k, g)
    base = attack_records(victim.images, victim.labels, **common)
    metrics = {"attack_mse_undefended": base.mse, "attack_label_accuracy_undefended": base.label_accuracy}
    text = f"{cfg.attack.upper()} on {len(idx)} records of client 0: MSE {base.mse:.3f} undefended"
    if cfg.defence != "none":
        defended = attack_records(victim.images, victim.labels, label_fn=label_fn, **common)
        metrics.update({"attack_mse": defended.mse, "attack_label_accuracy": defended.label_accuracy})
        text += f", {defended.mse:.3f} with {cfg.defence}"
    ctx.log_metrics(metrics)
    ctx.add_summary("attack", text + " (normalised-image MSE; higher is safer)")


def run_doorping_eval(ctx: Any, p: PreparedSFDD, result: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Doorping's success on the released set: one fresh model per malicious client's trigger."""
    from dpdistill.federated.attacks.doorping import evaluate_backdoor

    cfg, spec, ev = p.config, ctx.spec, ctx.spec.evaluation
    triggers = [(c, result.client_states[c]["trigger"]) for c in result.malicious if c in result.client_states]
    if not triggers:
        ctx.add_summary("doorping", "no malicious client took part; nothing to measure")
        return
    rows = [evaluate_backdoor(images, labels, p.test, trig, cfg.target_class, num_classes=p.info.num_classes,
                              mean=list(p.info.mean), std=list(p.info.std), model=ev.model,
                              model_kwargs=dict(ev.model_options), epochs=ev.epochs, seed=spec.seed, lr=ev.lr)
            for _, trig in triggers]
    asr = sum(r["asr"] for r in rows) / len(rows)
    clean = sum(r["clean_acc"] for r in rows) / len(rows)
    unstamped = sum(r["target_rate_unstamped"] for r in rows) / len(rows)
    ctx.log_metrics({"doorping_asr": asr, "doorping_clean_acc": clean, "doorping_target_rate_unstamped": unstamped})
    ctx.add_summary("doorping", f"attack success {100 * asr:.1f} % (without the trigger {100 * unstamped:.1f} % "
                    f"go to the target), clean accuracy {100 * clean:.2f} % "
                    f"({len(triggers)} of {cfg.n_clients} clients malicious, target class {cfg.target_class})")
