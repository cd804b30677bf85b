"""dpdistill: differentially private image synthesis and dataset distillation on Ray."""

from dpdistill.runtime import allocator as _allocator

__version__ = "0.1.0"

# Large tensor buffers stay in the heap instead of arriving as fresh pages on every allocation (CPU steps
# ~1.3-1.5x faster; runtime/allocator.py says why). Every process that imports the package gets it;
# DPDISTILL_MALLOC=default opts out.
_allocator.tune()
