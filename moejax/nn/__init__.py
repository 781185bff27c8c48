"""Flax NNX modules: experts, the MoE layer, attention, the decoder-only LM."""

from moejax.nn.attention import CausalSelfAttention, apply_rope, causal_attention
from moejax.nn.experts import ACTIVATIONS, MLP, DropoutExperts, Experts
from moejax.nn.moe_layer import MoELayer, routed_forward
from moejax.nn.transformer import (DecoderBlock, NonCausalRoutingWarning, TransformerLM,
                                   moe_layer_flags, noncausal_routing_reason)

__all__ = ["ACTIVATIONS", "CausalSelfAttention", "DecoderBlock", "DropoutExperts",
           "Experts", "MLP", "MoELayer", "NonCausalRoutingWarning", "TransformerLM",
           "apply_rope", "causal_attention", "moe_layer_flags", "noncausal_routing_reason",
           "routed_forward"]
