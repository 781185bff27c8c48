"""Flax NNX modules: experts, the MoE layer (later: attention, blocks, the LM)."""

from moejax.nn.experts import ACTIVATIONS, MLP, Experts
from moejax.nn.moe_layer import DENSE, ROUTER_OPTIONS, MoELayer

__all__ = ["ACTIVATIONS", "DENSE", "Experts", "MLP", "MoELayer", "ROUTER_OPTIONS"]
