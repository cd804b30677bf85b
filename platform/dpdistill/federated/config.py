"""SFDD options: DC's local distillation options plus the federation, defence and attack settings.

Total DC iterations are ``rounds x local_steps``: ``iterations`` is derived from them (and refused if it
disagrees), so a centralised DC run with the same config does the same number of iterations.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dpdistill.distill.dc import DCConfig

DEFENCES = ("none", "ldpo-rld", "localdp")
ATTACKS = ("none", "dlg", "idlg", "doorping")


class SFDDConfig(DCConfig):
    """Secure Federated Data Distillation (Arazzi et al., 2025): DC gradient matching across data owners."""

    # -- federation ---------------------------------------------------------------------------------------
    n_clients: int = Field(5, ge=1, le=100_000, description="simulated data owners")
    rounds: int = Field(20, ge=1, description="server rounds (broadcast -> local distillation -> aggregate)")
    local_steps: int = Field(1, ge=1, description="DC iterations (fresh matching network each) per client per round")
    fraction: float = Field(1.0, gt=0, le=1, description="share of clients sampled each round")
    min_clients: int = Field(1, ge=1, description="fewest answers for a round to count (else it is retried)")
    max_round_retries: int = Field(2, ge=0, description="retries of a round that got too few answers")
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (small: label-skewed)")
    weighting: Literal["size", "class", "uniform"] | None = Field(
        None, description="FedAvg weights: client size, per-class counts, or equal (None: size; uniform with LocalDP)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="FedAvgM server momentum on the aggregate change "
                                   "(0: plain FedAvg; 0.5 matches DC's image-optimiser momentum)")
    server_lr: float = Field(1.0, gt=0, description="FedAvgM server step on the velocity (1: plain FedAvg)")
    pool_size: int | None = Field(None, ge=1, description="Ray client actors (None: one per CPU, at most n_clients)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each client actor")
    init: Literal["noise", "public"] = Field("noise", description="server's initial set: N(mean, std) noise or public data")
    public_data: str | None = Field(None, description="dataset name for init: public (e.g. glyphs)")
    eval_every: int = Field(0, ge=0, description="rounds between accuracy evaluations (0: final only)")
    eval_epochs: int = Field(100, ge=1, description="epochs of the per-round accuracy model (one seed)")

    # -- defences -----------------------------------------------------------------------------------------
    defence: Literal["none", "ldpo-rld", "localdp"] = "none"
    ldpo_alpha: float = Field(0.3, ge=0, lt=1, description="LDPO-RLD: label mass moved off the true class")
    ldpo_k: int = Field(3, ge=1, description="LDPO-RLD: other classes that receive it (linearly decreasing)")
    localdp_sigma: float = Field(1.0, gt=0, description="LocalDP noise multiplier (noise std / clip)")
    localdp_clip: float = Field(1.0, gt=0, description="LocalDP L2 clip of each returned update")

    # -- attacks ------------------------------------------------------------------------------------------
    attack: Literal["none", "dlg", "idlg", "doorping"] = "none"
    attack_model: Literal["lenet", "convnet"] = Field(
        "lenet", description="DLG/iDLG victim network (sigmoid, no pooling, initial weights known to the server)")
    attack_targets: int = Field(4, ge=1, description="DLG/iDLG: records of client 0 attacked (one per attack)")
    attack_iterations: int = Field(300, ge=1, description="DLG/iDLG: LBFGS steps")
    malicious_clients: int = Field(1, ge=0, description="Doorping: clients that run the attack")
    target_class: int = Field(0, ge=0, description="Doorping: the class triggered inputs are sent to")
    trigger_size: int = Field(4, ge=1, description="Doorping: side of the square trigger patch (pixels)")
    poison_fraction: float = Field(0.3, gt=0, le=1, description="Doorping: poisoned share of a target-class batch")
    trigger_steps: int = Field(5, ge=0, description="Doorping: trigger optimisation steps per matching network")
    trigger_lr: float = Field(0.1, gt=0, description="Doorping: trigger step size (signed gradient, pixels)")

    @model_validator(mode="before")
    @classmethod
    def _derive_iterations(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        rounds = data.get("rounds", cls.model_fields["rounds"].default)
        steps = data.get("local_steps", cls.model_fields["local_steps"].default)
        if isinstance(rounds, int) and isinstance(steps, int):
            total = rounds * steps
            given = data.get("iterations")
            if given is not None and given != total:
                raise ValueError(f"iterations is rounds x local_steps = {total} for SFDD; set rounds and local_steps "
                                 f"instead (got iterations={given})")
            data = {**data, "iterations": total}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SFDDConfig:
        if self.net_norm == "batch":
            # Batch-norm statistics of a client's real data would be a second, unaccounted channel to the server.
            raise ValueError("net_norm: batch norm is not supported for SFDD (use instance, group, layer or none)")
        if self.min_clients > self.n_clients:
            raise ValueError(f"min_clients={self.min_clients} exceeds n_clients={self.n_clients}")
        if self.defence == "localdp" and self.weighting in ("size", "class"):
            raise ValueError("weighting: LocalDP releases must not depend on client sizes (they are data-dependent); "
                             "use weighting: uniform")
        if self.init == "public" and not self.public_data:
            raise ValueError("init: public needs public_data (a dataset name, e.g. glyphs)")
        if self.attack == "doorping" and self.malicious_clients > self.n_clients:
            raise ValueError(f"malicious_clients={self.malicious_clients} exceeds n_clients={self.n_clients}")
        return self

    @property
    def aggregation_weighting(self) -> str:
        """The FedAvg weighting in force (size by default, uniform under LocalDP)."""
        if self.weighting is not None:
            return self.weighting
        return "uniform" if self.defence == "localdp" else "size"

    def clients_per_round(self) -> int:
        """Clients sampled each round: ``round(fraction x n_clients)``, at least ``min_clients``."""
        return min(self.n_clients, max(self.min_clients, round(self.fraction * self.n_clients)))
