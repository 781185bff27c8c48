"""Scaling: parameter and FLOP accounting for dense and MoE models."""

from moejax.scaling.accounting import (breakdown, config_vocab_size, counts_from_config,
                                       param_counts, train_flops_per_token)

__all__ = ["breakdown", "config_vocab_size", "counts_from_config", "param_counts",
           "train_flops_per_token"]
