"""unialign_jax: UniAlignment (SD3 MMDiT for generation, editing, perception, composition and
captioning) in JAX / Flax NNX, TPU-first.

Parameters carry logical axis names; they are placed on devices by the rules in
`unialign_jax.parallel.rules`, never eagerly at creation, so models can be built abstractly
(`nnx.eval_shape`) for any mesh.
"""

import importlib

import flax

flax.config.update("flax_always_shard_variable", False)

# Public loaders, imported on first use so that `import unialign_jax` stays light.
_LOADERS = {
    "load_transformer": "unialign_jax.checkpoints.registry",
    "load_t5": "unialign_jax.checkpoints.registry",
    "load_vae": "unialign_jax.checkpoints.registry",
    "load_pipeline": "unialign_jax.sampling.pipeline",
}

__all__ = list(_LOADERS)


def __getattr__(name):
    if name in _LOADERS:
        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(f"module 'unialign_jax' has no attribute {name!r}")
