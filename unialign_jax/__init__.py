"""unialign_jax: UniAlignment (SD3 MMDiT for generation, editing, perception, composition and
captioning) in JAX / Flax NNX, TPU-first.

Parameters carry logical axis names; they are placed on devices by the rules in
`unialign_jax.parallel.rules`, never eagerly at creation, so models can be built abstractly
(`nnx.eval_shape`) for any mesh.
"""

import glob
import importlib
import os

import flax

flax.config.update("flax_always_shard_variable", False)

# libtpu (installed by the `tpu` and `test` extras) is loaded by JAX's backend discovery and
# by `get_topology_desc`. On a host without TPU chips it then probes for a TPU VM's metadata
# and prints errors unless told what the host is, and takes a lock file that fails every
# other process loading it (two TPU plans, or a plan and a test, at once); JAX's discovery
# also spends its load and init time (about 0.1 s idle, and 120 MB) on every start to find
# no TPU. So where the PCI bus is visible and holds no TPU chip (JAX's own check), libtpu is
# told what the host is (only libtpu reads these variables; set only where unset) and, unless
# JAX_PLATFORMS names the platforms, JAX's TPU backend fails at once (quietly, as it does
# without libtpu) instead of loading libtpu: CPU and GPU runs start as they do without it,
# and compiling for a topology (which loads libtpu itself) still works. A TPU VM, or a host
# whose PCI bus cannot be seen, is left alone.
LIBTPU_HOST_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-1", "TPU_WORKER_HOSTNAMES": "localhost",
                   "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def _no_tpu_backend():
    raise RuntimeError("no TPU chip on this host's PCI bus (unialign_jax skipped loading libtpu)")


def _keep_libtpu_away_without_chips() -> None:
    """The above. JAX has no public API for either step (its chip count and its backend
    registry are in `jax._src`), so a JAX release that moves them leaves JAX's own behaviour
    (libtpu probed and noisy on a CPU host) rather than breaking the import."""
    try:
        from jax._src import hardware_utils, xla_bridge

        if not glob.glob("/sys/bus/pci/devices/*") or \
                hardware_utils.num_available_tpu_chips_and_device_id()[0] != 0:
            return
        for key, value in LIBTPU_HOST_ENV.items():
            os.environ.setdefault(key, value)
        if not os.environ.get("JAX_PLATFORMS"):
            xla_bridge.register_backend_factory("tpu", _no_tpu_backend, priority=300,
                                                fail_quietly=True)
    except (ImportError, AttributeError, TypeError):
        return


_keep_libtpu_away_without_chips()

# Public loaders, imported on first use so that `import unialign_jax` stays light.
_LOADERS = {
    "load_transformer": "unialign_jax.checkpoints.registry",
    "load_t5": "unialign_jax.checkpoints.registry",
    "load_vae": "unialign_jax.checkpoints.registry",
    "load_pipeline": "unialign_jax.sampling.unialign_pipeline",
}

__all__ = list(_LOADERS)


def __getattr__(name):
    if name in _LOADERS:
        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(f"module 'unialign_jax' has no attribute {name!r}")
