"""How a model runs, as opposed to what it is (its config) and what it holds (its weights).

One value carries every runtime option from where it is chosen — `unialign-sample`'s flags,
a run's `compute` section (`ComputeConfig.runtime`), a notebook's `load_pipeline(...)`
keywords — to the module constructors, whole: the loaders in between pass it on without
naming its fields, and `build` hands a module every field its constructor takes. A new
option is a field here and the code in `models/` that reads it; nothing in between changes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from unialign_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Runtime:
    dtype: Any = jnp.float32             # compute dtype
    param_dtype: Any = None              # storage dtype; None: as stored (fresh: float32)
    attention: str = "auto"              # the kernel, an `attention.IMPLEMENTATIONS` name
    remat_policy: str | None = None      # the transformer's blocks (`models.remat`)
    # Placement on a mesh (`parallel.placed_on` sets both): of the activations carried
    # between layers, and of the variables (abstract module -> tree of shardings).
    activation_sharding: layers.Shard | None = None
    shardings: Callable[[nnx.Module], Any] | None = None

    def build(self, module_class, config, rngs: nnx.Rngs) -> nnx.Module:
        """`module_class(config, rngs=rngs, ...)` with each field its constructor takes (a
        field left None keeps the constructor's default)."""
        taken = _parameters(module_class)
        return module_class(config, rngs=rngs, **{
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name in taken and getattr(self, f.name) is not None})

    def storing(self, param_dtype) -> "Runtime":
        """This runtime with the weights stored as `param_dtype` unless it sets its own."""
        chosen = param_dtype if self.param_dtype is None else self.param_dtype
        return dataclasses.replace(self, param_dtype=jnp.dtype(chosen))


@functools.cache
def _parameters(module_class) -> frozenset[str]:
    return frozenset(inspect.signature(module_class.__init__).parameters)
