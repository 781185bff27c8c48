"""Parallelism: meshes, logical->mesh sharding rules, expert parallelism.

    mesh = parallel.make_mesh(config.mesh)             # axes AXES
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    with parallel.activate(mesh):                       # the ambient mesh
      step(params, jax.device_put(batch, parallel.batch_sharding(mesh)))

Inside `activate`, `nn.MoELayer` runs its routed experts expert parallel
(`parallel.expert_parallel`); attention and dense layers follow the parameter
and batch shardings (GSPMD / sharding-in-types).
"""

from moejax.parallel import collectives, expert_parallel
from moejax.parallel.mesh import (AXES, AXIS_TYPES, activate, check_routing_groups,
                                  current_mesh, make_mesh, platform,
                                  validate_mesh_config, with_auto_axes)
from moejax.parallel.rules import (LOGICAL_RULES, PARAM_AXES, batch_sharding,
                                   logical_to_spec, mesh_axes, param_logical_axes,
                                   param_shardings, shard_like)

__all__ = ["AXES", "AXIS_TYPES", "LOGICAL_RULES", "PARAM_AXES", "activate",
           "batch_sharding", "check_routing_groups", "current_mesh", "expert_parallel",
           "logical_to_spec", "make_mesh", "mesh_axes", "param_logical_axes",
           "param_shardings", "platform", "shard_like", "validate_mesh_config",
           "with_auto_axes"]
