"""Evaluation protocols (utility, fidelity, empirical privacy); import the submodule you need."""
