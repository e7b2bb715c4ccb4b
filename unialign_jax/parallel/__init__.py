"""Device meshes, the logical-axis rules, and placement of models and batches on a mesh."""

from unialign_jax.parallel.mesh import BATCH_AXES, MESH_AXES, make_mesh, maybe_initialize_distributed
from unialign_jax.parallel.rules import (LOGICAL_AXIS_RULES, ActivationSharding, batch_sharding,
                                         batch_ways, module_shardings, placed_on,
                                         replicated, state_shardings)

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "ActivationSharding",
           "batch_sharding", "batch_ways", "make_mesh", "maybe_initialize_distributed",
           "module_shardings", "placed_on", "replicated", "state_shardings"]
