"""Dataset distillation: matching losses, DSA, multi-formation, and distillers found by name.

>>> from dpdistill import distill
>>> method = distill.get("dm")
>>> syn = method.run(real_imageset, method.config(ipc=10, iterations=300), seed=0)
>>> images, labels = syn.export()

Every distiller is ``run(real, cfg, seed=..., *, progress=..., callback=..., **kw) -> SyntheticSet``; private
ones also take ``ledger=`` and ``noise=`` (a :class:`~dpdistill.privacy.noise.PrivacyRandomness`; None: a
fresh secret source), from which every noise draw and private sampling decision comes; ``seed`` drives only
data-independent randomness. Methods are named in :mod:`~dpdistill.distill.registry` and imported when first
asked for; each describes itself (a :func:`register` call in the module that defines it), a private one with
its ``DISCLOSURE`` (what each key it makes the job log is, in the kinds of :mod:`dpdistill.privacy.disclosure`).
The methods' configs and run functions live in their modules (``dpdistill.distill.dm.DMConfig``, …).
"""

from __future__ import annotations

from dpdistill.distill.registry import Distiller, get, names, register

__all__ = ["Distiller", "get", "names", "register"]
