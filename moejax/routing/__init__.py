"""Routing: routers (NNX modules, one registry), the `Routing` value they
produce, capacity rules, scores and selection, balancing losses, metrics.

`routing.route(logits, router=..., **options)` is the pure entry point of the
logit-based routers; `routing.ROUTERS` maps each `config.model.moe.router`
name to its `Router` class (see `routing.routers` for the contract).
"""

from moejax.routing import more_routers  # registers soft_moe and hash
from moejax.routing.capacity import (expert_choice_capacity, is_dropless,
                                     token_choice_capacity)
from moejax.routing.config import AUX_LOSS_TYPES, GROUP_BY, SCORE_FNS, MoEConfig
from moejax.routing.losses import load_balancing_loss, router_z_loss
from moejax.routing.routers import (QB_QUANTILE, ROUTERS, LogitRouter, RouteContext, Router,
                                    RouterState, TokenChoiceRouter, apply_jitter,
                                    get_router, register_router, resolve_dispatch,
                                    route, validate)
from moejax.routing.scores import Selection, select_experts
from moejax.routing.types import Routing

del more_routers

__all__ = [
    "AUX_LOSS_TYPES", "GROUP_BY", "LogitRouter", "QB_QUANTILE", "MoEConfig", "ROUTERS", "RouteContext",
    "Router", "RouterState", "Routing", "SCORE_FNS", "Selection", "TokenChoiceRouter",
    "apply_jitter", "expert_choice_capacity", "get_router", "is_dropless",
    "load_balancing_loss", "register_router", "resolve_dispatch", "route",
    "router_z_loss", "select_experts", "token_choice_capacity", "validate",
]
