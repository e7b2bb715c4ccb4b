"""The training mesh: axes (data, fsdp, tensor), sized from the config.

`data` replicates parameters and splits the batch; `fsdp` splits both the batch and the
parameters / optimizer state (ZeRO-3 style: weights are all-gathered per layer inside the
scan); `tensor` splits the wide matmul dimensions (heads, MLP, vocabulary). The batch is
split over data × fsdp.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1
               ) -> tuple[int, int, int]:
    """Resolves one -1 entry to the remaining devices; the product must be `num_devices`."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                         f"tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, but {num_devices} are available")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all hosts).

    On real hardware `jax.make_mesh` orders devices so that the inner axes (tensor, then
    fsdp) sit on the fastest interconnect; explicit device lists are used as given.
    """
    if devices is None:
        shape = mesh_shape(jax.device_count(), data, fsdp, tensor)
        return jax.make_mesh(shape, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def maybe_initialize_distributed(enabled: bool | None, heartbeat_timeout_s: int = 100) -> bool:
    """Calls `jax.distributed.initialize()` for multi-host runs; returns whether it did.

    `enabled=None` decides from the environment: UNIALIGN_DISTRIBUTED=1. Cloud TPU pod
    slices need nothing else (JAX detects the cluster); elsewhere — several processes on
    one machine, as tests/test_faults_multihost.py runs them — JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID say who is who. A host that sends no heartbeat
    for `heartbeat_timeout_s` is declared dead and the others stop. Must run before
    anything touches a device.
    """
    if enabled is None:
        enabled = os.environ.get("UNIALIGN_DISTRIBUTED", "") == "1"
    if not enabled:
        return False
    explicit = {key: int(os.environ[var]) for key, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                            ("process_id", "JAX_PROCESS_ID"))
                if os.environ.get(var)}
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s, **explicit)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True
