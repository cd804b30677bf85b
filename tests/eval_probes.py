"""Picklable augmentations for tests/test_eval_parallel.py that observe or break evaluation worker processes.

They live in their own module so spawned workers import them without importing a test module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


class ThreadProbe:
    """Identity augmentation that fails unless torch runs with ``expected`` intra-op threads."""

    def __init__(self, expected: int) -> None:
        self.expected = expected

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() != self.expected:
            raise RuntimeError(f"trained with {torch.get_num_threads()} threads, expected {self.expected}")
        return images


class Boom:
    """Augmentation that raises, as a bug in a worker would."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom from the augmentation")


class Die:
    """Augmentation that ends its process at once, as the kernel's OOM killer would."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        os._exit(3)


class PidThenSleep:
    """Augmentation that writes its process id to ``folder`` and then sleeps (a worker busy training)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        Path(self.folder, f"{os.getpid()}.pid").write_text(str(os.getpid()))
        time.sleep(600)
        return images
