"""Training engines for private models: DP-SGD over any network from a public, already-charged schedule.

Plain torch (and ``torch.distributed`` for sharded runs): no Ray and no ledger here. Where the engine runs (one
process, or Ray Train workers) is :mod:`dpdistill.runtime.dp_train`'s choice; what it may spend was charged on
the driver before it starts.
"""
