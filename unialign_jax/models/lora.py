"""LoRA (low-rank adaptation) of a model's linear layers, added from outside the model.

A targeted `nnx.Linear` is replaced in place by a `LoraLinear` that holds the *same*
kernel and bias variables — every base parameter keeps its path, so base trees,
checkpoints and exports are unchanged — plus the factors A (…, in, r) and B (…, r, out);
its output is x·W + b + scale·(x·A)·B with scale = alpha / rank, as PEFT computes it.

Why a wrapper rather than a pure function merging W + scale·A·B into the parameter tree
inside the step (which would leave the model code just as untouched): a merge materialises
a merged copy of every targeted kernel and, in the backward pass, its full-size gradient —
the memory LoRA exists to save — and, over a bf16 base, rounds a small scale·A·B away in
the forward pass. The wrapper differentiates through the factors only, keeps the update
exact over any base dtype, and gives the pipeline its unmerged mode (a LoRA applied at
call, removed by putting the original layers back). Stacked (scanned) blocks need nothing
special: their factors carry the kernels' leading layer axis, so the scan slices them with
the rest of the block.

Factors travel as a *factor tree*: a nested dict shaped like the model's state, holding
only `lora_a` / `lora_b` leaves under each adapted layer's path (what `nnx.state(model,
LoraParam)` gives as a pure dict, and what a LoRA run checkpoints).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

Path = tuple[str, ...]

# Named groups of `targets` → glob patterns over dotted module paths ('*' spans dots).
GROUPS = {
    "image_attn": ("*.attn.to_q", "*.attn.to_k", "*.attn.to_v", "*.attn.to_out"),
    "text_attn": ("*.attn.add_q_proj", "*.attn.add_k_proj", "*.attn.add_v_proj",
                  "*.attn.to_add_out"),
    "image_mlp": ("*.ff.proj_in", "*.ff.proj_out"),
    "text_mlp": ("*.ff_context.proj_in", "*.ff_context.proj_out"),
    "adapters": ("adapter_img.*", "adapter_text.*"),
}
# Both attention streams: the layers diffusers' SD3 DreamBooth-LoRA script adapts.
DEFAULT_TARGETS = ("image_attn", "text_attn")
INITS = ("kaiming", "gaussian")
FACTORS = ("lora_a", "lora_b")


class LoraParam(nnx.Param):
    """A LoRA factor: with a run's `train_also` tensors, the only parameters it trains."""


def scale(rank: int, alpha: float | None) -> float:
    """PEFT's alpha / rank; alpha None means alpha = rank (scale 1, diffusers' default)."""
    return float(rank if alpha is None else alpha) / rank


def dotted(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def target_patterns(target: str) -> tuple[str, ...]:
    """A `targets` entry's glob patterns: a group's, else the entry itself."""
    return GROUPS.get(target, (target,))


def linear_paths(module: nnx.Module) -> list[Path]:
    return [tuple(p) for p, m in nnx.iter_modules(module) if isinstance(m, nnx.Linear)]


def resolve_targets(module: nnx.Module, targets: Sequence[str]) -> list[Path]:
    """The paths of the linear layers `targets` name, sorted; an entry that matches none is
    an error listing the layers there are."""
    by_name = {dotted(p): p for p in linear_paths(module)}
    chosen: set[str] = set()
    for target in targets:
        hits = {n for pattern in target_patterns(target) for n in fnmatch.filter(by_name, pattern)}
        if not hits:
            raise ValueError(f"LoRA target {target!r} matches no linear layer of this model; "
                             f"name a group ({', '.join(GROUPS)}) or a glob over its linear "
                             f"layers: {', '.join(sorted(by_name))}")
        chosen |= hits
    return [by_name[n] for n in sorted(chosen)]


def layer(module: nnx.Module, path: Path):
    """The submodule of `module` at `path`."""
    for name in path:
        module = getattr(module, name)
    return module


def _set(module: nnx.Module, path: Path, value) -> None:
    setattr(layer(module, path[:-1]), path[-1], value)


def target_shapes(module: nnx.Module, targets: Sequence[str]) -> dict[Path, tuple[int, ...]]:
    """{path: kernel shape} of the targeted layers (the module may be abstract)."""
    return {p: tuple(layer(module, p).kernel.shape) for p in resolve_targets(module, targets)}


def new_factors(shapes: dict[Path, tuple[int, ...]], rank: int, key: jax.Array,
                init: str = "kaiming", dtype=jnp.float32) -> dict:
    """A fresh factor tree as PEFT initialises it: B = 0 (the model is unchanged until
    trained) and A kaiming-uniform (bound 1/√in) or, for "gaussian", normal with std 1/r.
    Pure, so it runs under `jit` (sharded) or `eval_shape`."""
    if init not in INITS:
        raise ValueError(f"LoRA init must be one of {INITS}, got {init!r}")
    flat = {}
    for path, k in zip(sorted(shapes), jax.random.split(key, max(len(shapes), 1))):
        *lead, fan_in, fan_out = shapes[path]
        a_shape = (*lead, fan_in, rank)
        if init == "kaiming":
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, a_shape, dtype, -bound, bound)
        else:
            a = jax.random.normal(k, a_shape, dtype) / rank
        flat[(*path, "lora_a")] = a
        flat[(*path, "lora_b")] = jnp.zeros((*lead, rank, fan_out), dtype)
    return traverse_util.unflatten_dict(flat)


def split_tree(tree: dict) -> tuple[dict[Path, tuple], dict]:
    """({layer path: (A, B)}, the other leaves as a nested dict) of a tree holding factors
    (a factor tree, or a LoRA run's trained tree with its `train_also` tensors)."""
    flat = traverse_util.flatten_dict(tree)
    layers = {path[:-1] for path in flat if path[-1] in FACTORS}
    factors = {p: (flat[(*p, "lora_a")], flat[(*p, "lora_b")]) for p in sorted(layers)}
    rest = {k: v for k, v in flat.items() if k[-1] not in FACTORS}
    return factors, traverse_util.unflatten_dict(rest)


def _check(target, path: Path, a, b) -> None:
    if not isinstance(target, nnx.Linear):
        raise ValueError(f"{dotted(path)} is not a linear layer")
    *lead, fan_in, fan_out = target.kernel.shape
    if tuple(a.shape[:-1]) != (*lead, fan_in) or tuple(b.shape) != (*lead, a.shape[-1], fan_out):
        raise ValueError(f"LoRA factors of {dotted(path)} have shapes A {tuple(a.shape)}, B "
                         f"{tuple(b.shape)}; its kernel {tuple(target.kernel.shape)} needs A "
                         f"{(*lead, fan_in, 'r')} and B {(*lead, 'r', fan_out)}")


_LINEAR_FIELDS = ("in_features", "out_features", "use_bias", "dtype", "param_dtype",
                  "precision", "dot_general", "promote_dtype", "preferred_element_type")


class LoraLinear(nnx.Linear):
    """`base` (its own kernel and bias variables, same paths) plus scale·(x·A)·B.

    The factors' logical axis names follow the kernel's (A: its input axis, B: its output
    axis, the rank replicated), so the rules shard them like the layer they adapt."""

    def __init__(self, base: nnx.Linear, a, b, scale: float):
        # Not Linear.__init__: the base's own settings and variables are taken over.
        for name in _LINEAR_FIELDS:
            setattr(self, name, getattr(base, name))
        self.kernel = base.kernel
        self.bias = base.bias if base.bias is not None else nnx.data(None)
        names = base.kernel.get_metadata().get("out_sharding") or (None,) * base.kernel.ndim
        self.lora_a = LoraParam(a, out_sharding=(*names[:-1], None))
        self.lora_b = LoraParam(b, out_sharding=(*names[:-2], None, names[-1]))
        self.scale = float(scale)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]),
                                     dtype=self.dtype)
        return super().__call__(inputs, out_sharding) + self.scale * ((x @ a) @ b)


def wrap(module: nnx.Module, factors: dict, scale: float) -> dict[Path, nnx.Linear]:
    """Replaces (in place) each layer of the factor tree `factors` by a `LoraLinear` with
    its factors; returns the replaced layers, for `unwrap`."""
    originals = {}
    for path, (a, b) in split_tree(factors)[0].items():
        base = layer(module, path)
        if isinstance(base, LoraLinear):
            raise ValueError(f"{dotted(path)} already carries a LoRA")
        _check(base, path, a, b)
        _set(module, path, LoraLinear(base, a, b, scale))
        originals[path] = base
    return originals


def unwrap(module: nnx.Module, originals: dict[Path, nnx.Linear]) -> None:
    """Puts back the layers `wrap` replaced: the base exactly as it was."""
    for path, original in originals.items():
        _set(module, path, original)


@jax.jit
def _merged(kernel, a, b, scale):
    update = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * update).astype(kernel.dtype)


def merge(module: nnx.Module, factors: dict, scale: float) -> dict[Path, jax.Array]:
    """Adds scale·A·B into each adapted kernel (in float32, stored in the kernel's dtype);
    returns the kernels it replaced, for `restore_kernels`."""
    old = {}
    for path, (a, b) in split_tree(factors)[0].items():
        target = layer(module, path)
        _check(target, path, a, b)
        old[path] = target.kernel[...]
        target.kernel.set_value(_merged(old[path], a, b, jnp.float32(scale)))
    return old


def restore_kernels(module: nnx.Module, old: dict[Path, jax.Array]) -> None:
    """Undoes `merge` exactly: the replaced kernels go back."""
    for path, kernel in old.items():
        layer(module, path).kernel.set_value(kernel)


def full_filter(train_also: Sequence[str] = ()):
    """The nnx filter of the base parameters a LoRA run trains in full: those whose dotted
    path matches a `train_also` glob (e.g. 'text_proj_out.*')."""
    def full(path, variable) -> bool:
        return (isinstance(variable, nnx.Param) and not isinstance(variable, LoraParam)
                and any(fnmatch.fnmatchcase(dotted(path), p) for p in train_also))

    return full


def trained_filter(train_also: Sequence[str] = ()):
    """The nnx filter of what a LoRA run trains: the factors and the `train_also` tensors."""
    return nnx.Any(LoraParam, full_filter(train_also))


def check_train_also(module: nnx.Module, train_also: Sequence[str]) -> None:
    """Each `train_also` glob must match a parameter path of `module`."""
    names = [dotted(p) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    for pattern in train_also:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"lora.train_also pattern {pattern!r} matches no parameter; "
                             f"parameter paths look like {', '.join(names[:6])}, …")
