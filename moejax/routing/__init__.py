"""Routing: router logits -> `Routing`. Pure functions, no Flax modules."""

from moejax.routing.capacity import (expert_choice_capacity, is_dropless,
                                     token_choice_capacity)
from moejax.routing.core import (ROUTERS, RouterOptions, apply_jitter,
                                 register_router, route, validate_router_options)
from moejax.routing.losses import load_balancing_loss, router_z_loss
from moejax.routing.types import Routing

__all__ = [
    "ROUTERS", "Routing", "RouterOptions", "apply_jitter", "expert_choice_capacity",
    "is_dropless", "load_balancing_loss", "register_router", "route",
    "router_z_loss", "token_choice_capacity", "validate_router_options",
]
