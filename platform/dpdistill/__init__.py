"""dpdistill: differentially private image synthesis and dataset distillation on Ray."""
__version__ = "0.1.0"
