"""The training mesh: axes (data, fsdp, tensor), sized from the config.

`data` replicates parameters and splits the batch; `fsdp` splits both the batch and the
parameters / optimizer state (ZeRO-3 style: weights are all-gathered per layer inside the
scan); `tensor` splits the wide matmul dimensions (heads, MLP, vocabulary). The batch is
split over data × fsdp.
"""

from __future__ import annotations

import importlib.util
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

    TPU devices are ordered by `jax.make_mesh` so that the inner axes (tensor, then fsdp)
    sit on the fastest interconnect, for a running pod and for a topology's abstract
    devices alike (`scripts/tpu_plan.py` compiles the collectives the pod will run); other
    explicit device lists are used as given.
    """
    given = devices is not None and devices[0].platform != "tpu"
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    if given:
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def tpu_topology_devices(topology: str) -> list:
    """The abstract devices of a named TPU topology ("v5e:8x8", "v5p:4x4x4", "v6e:2x2",
    anything `jax.experimental.topologies.get_topology_desc` accepts), on any host with
    libtpu installed: programs placed on them compile with the TPU compiler, nothing runs."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    # (libtpu's host-probing messages on a host without TPU chips are silenced when
    # `unialign_jax` is imported: see `unialign_jax.LIBTPU_HOST_ENV`.)
    try:
        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology).devices)
    except jax.errors.JaxRuntimeError as e:
        if "chips_per_host_bounds" not in str(e):
            raise
    # smaller than one host of its generation (v5e:1x1): one host holding every chip
    dims = [int(v) for v in topology.split(":")[-1].split("x")]
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=topology,
        chips_per_host_bounds=tuple(dims + [1] * (3 - len(dims)))).devices)


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
