"""Key mapping between diffusers' SD3 / UniAlignment state dicts and our parameter tree.

The mapping is derived from the abstract (shape-only) model, so it covers exactly the
parameters that `MMDiT` has for a given configuration — nothing is listed by hand twice.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from unialign_convert.param_mapping import CONV, LINEAR, TensorMove
from unialign_jax.models.embeddings import sincos_2d_table
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.mmdit_names import diffusers_module

# Free-standing arrays: our path → (diffusers key, axis permutation).
_ARRAYS = {
    ("pos_embed",): ("pos_embed.pos_embed", None),
    ("patch_embed", "kernel"): ("pos_embed.proj.weight", CONV),
    ("patch_embed", "bias"): ("pos_embed.proj.bias", None),
    ("null_image_embd",): ("null_image_embd", None),
}


def abstract_params(config: MMDiTConfig) -> dict:
    """Shapes and dtypes of the model's whole tree (the position buffer included), without
    allocating it."""
    model = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


def _linear_key(path: tuple[str, ...], config: MMDiTConfig, layer: int | None = None
                ) -> tuple[str, tuple[int, ...] | None]:
    """(diffusers key, permutation) of a Linear's kernel/bias at `path`."""
    *module, leaf = path
    name = diffusers_module(tuple(module), config, layer)
    return (f"{name}.weight", LINEAR) if leaf == "kernel" else (f"{name}.bias", None)


def tensor_moves(config: MMDiTConfig) -> list[TensorMove]:
    """Every diffusers tensor of a `config` model and where it lands, in our tree's order."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    moves = []
    for keypath, leaf in flat:
        path = tuple(k.key for k in keypath)
        if path[0] == "blocks":
            for i in range(leaf.shape[0]):
                name, perm = _linear_key(path, config, i)
                moves.append(TensorMove(name, path, perm, i))
        elif path in _ARRAYS:
            name, perm = _ARRAYS[path]
            moves.append(TensorMove(name, path, perm))
        else:
            name, perm = _linear_key(path, config)
            moves.append(TensorMove(name, path, perm))
    return moves


def torch_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict layout (key → shape) that a `config` model converts from."""
    leaves = {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in
              jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
    return {m.source: m.source_shape(leaves[m.target][0 if m.layer is None else 1:])
            for m in tensor_moves(config)}


def fresh_initialiser(config: MMDiTConfig, shapes: dict[tuple, tuple[int, ...]], seed: int = 0):
    """`fresh(move, shape)` for tensors the source lacks, drawn as the release's do.

    The release builds `SD3JointModelFlexible` in PyTorch and loads the SD3 weights into it
    non-strictly, so what they lack keeps PyTorch's default initialisation: an `nn.Linear`
    (or `nn.Conv2d`) weight is kaiming-uniform with a = √5, i.e. uniform(±1/√fan_in), and
    its bias uniform(±1/√fan_in) of the same fan_in; the null image tokens are
    `randn / √width` (`modules/unialignment_model.py`); the position table is the fixed
    sin-cos one. `shapes` holds the full tree's shapes ({path: shape}), where a bias finds
    its weight's fan_in.
    """
    rng = np.random.default_rng(seed)

    def fresh(move: TensorMove, shape: tuple[int, ...]) -> np.ndarray:
        if move.target == ("pos_embed",):
            return np.asarray(sincos_2d_table(config.width, config.pos_embed_max_size,
                                              config.sample_size // config.patch_size))[None]
        if move.target == ("null_image_embd",):
            return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(config.width))
        if move.target[-1] == "kernel":
            kernel = shape
        else:  # a bias: its weight's fan_in (one layer's kernel of a stacked block)
            kernel = shapes[move.target[:-1] + ("kernel",)][0 if move.layer is None else 1:]
        bound = 1.0 / np.sqrt(np.prod(kernel[:-1]))  # fan_in: all axes but the output one
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return fresh
