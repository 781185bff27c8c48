"""Scaling: parameter and FLOP accounting for dense and MoE models."""

from moejax.scaling.accounting import param_counts, train_flops_per_token

__all__ = ["param_counts", "train_flops_per_token"]
