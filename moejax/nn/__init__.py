"""Flax NNX modules: experts, the MoE layer, attention, the decoder-only LM."""

from moejax.nn.attention import CausalSelfAttention, apply_rope, causal_attention
from moejax.nn.experts import ACTIVATIONS, MLP, Experts
from moejax.nn.moe_layer import DENSE, GROUP_BY, ROUTER_OPTIONS, MoELayer
from moejax.nn.transformer import (DecoderBlock, NonCausalRoutingWarning, TransformerLM,
                                   moe_layer_flags, noncausal_routing_reason)

__all__ = ["ACTIVATIONS", "CausalSelfAttention", "DENSE", "DecoderBlock", "Experts",
           "GROUP_BY", "MLP", "MoELayer", "NonCausalRoutingWarning", "ROUTER_OPTIONS",
           "TransformerLM", "apply_rope", "causal_attention", "moe_layer_flags",
           "noncausal_routing_reason"]
