"""The allocator setting dpdistill makes at import (runtime/allocator.py): on glibc it is in force, it can be
turned off, and it does what it is for — a CPU training loop stops faulting fresh pages in every epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Train the evaluation ConvNet a few epochs in micro-batches (the allocation pattern of every CPU training loop
# here), then count the page faults of the next epochs.
TRAIN = """
import resource, torch
from dpdistill.evaluation.training import MICRO_BATCH, train_classifier
from dpdistill.models import registry as models
from dpdistill.runtime import allocator
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, y = torch.rand(400, 1, 28, 28, generator=g), torch.arange(400) % 10
torch.manual_seed(0)
net = models.get("convnet", channels=1, num_classes=10, image_size=28, width=32)
kw = dict(batch_size=256, augment="dsa-lite", mean=[0.5], std=[0.5], micro_batch=MICRO_BATCH)
train_classifier(net, x, y, epochs=2, **kw)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train_classifier(net, x, y, epochs=4, **kw)
print(allocator.tuned(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(malloc: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("DPDISTILL_MALLOC", None)
    if malloc is not None:
        env["DPDISTILL_MALLOC"] = malloc
    env["PYTHONPATH"] = str(ROOT / "platform")
    done = subprocess.run([sys.executable, "-c", TRAIN], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tuned, faults = done.stdout.split()[-2:]
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_setting_is_in_force_and_a_training_loop_stops_faulting_fresh_pages():
    tuned, faults = _faults(None)
    default_tuned, default_faults = _faults("default")
    assert tuned and not default_tuned
    # Measured here: ~45,000-58,000 faults per epoch with glibc's defaults, 0-100 with the setting; CI's machine
    # counted 11,074 over the 4 epochs with the defaults once, and 1 in another run (glibc's dynamic mmap
    # threshold can adapt during the warm-up epochs and serve them from the heap; THP faults 2 MiB at a time).
    # A third run counted 4,033 with the defaults and 3,074 with the setting: where the defaults fault little,
    # the cut is not measurable either. Below 5,000 faults per epoch the premise is reported, not failed.
    if default_faults <= 4 * 5_000:
        pytest.skip(f"premise not met on this machine: glibc's defaults faulted {default_faults} pages over 4 "
                    f"epochs (the setting: {faults}); the tenfold cut cannot be measured here")
    assert faults < default_faults / 10, (faults, default_faults)
