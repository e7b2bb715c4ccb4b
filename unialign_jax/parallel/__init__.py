"""Device meshes and the logical-axis → mesh-axis rules that place every array."""

from unialign_jax.parallel.mesh import BATCH_AXES, MESH_AXES, make_mesh, maybe_initialize_distributed
from unialign_jax.parallel.rules import (LOGICAL_AXIS_RULES, batch_sharding, module_shardings,
                                         replicated, state_shardings)

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "make_mesh",
           "maybe_initialize_distributed", "module_shardings", "replicated", "state_shardings"]
