"""Marking a release that carries no privacy guarantee (DM, DC, SFDD without LocalDP): one hook for every kind.

Such a run is computed from real records without noise, so its outputs may reproduce them. The run says so
everywhere a reader looks — ``artifacts/RELEASE_NOT_PRIVATE.txt``, ``not_private`` in status.json and
metrics.json, the summary, the MLflow tag ``dpdistill.release`` — and its images stay out of MLflow unless the
spec opts in with ``tracking.log_nonprivate_images`` (the run folder keeps them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("dpdistill.pipelines")

RELEASE_NOT_PRIVATE = "RELEASE_NOT_PRIVATE.txt"


def mark_release_not_private(ctx: Any, reason: str, image_artifacts: Iterable[str]) -> None:
    """Stamp the run NOT PRIVATE (``reason`` is the one line shown everywhere) and keep its images untracked."""
    from dpdistill.runtime.runfolder import atomic_write_text

    atomic_write_text(ctx.run.artifacts / RELEASE_NOT_PRIVATE,
                      f"{reason}.\nThe files in this folder may contain sensitive records: do not publish them.\n")
    ctx.run.set_status("running", not_private=reason)
    ctx.log_metrics({"not_private": 1.0})
    ctx.tracker.set_tags({"dpdistill.release": "NOT PRIVATE"})
    ctx.add_summary("NOT PRIVATE", reason)
    if not ctx.spec.tracking.log_nonprivate_images:
        ctx.untracked.update(image_artifacts)
    log.warning(reason)
