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

# Our module path (inside a block) → diffusers module name.
_BLOCK_MODULES = {
    ("norm1",): "norm1.linear",
    ("norm1_context",): "norm1_context.linear",
    ("attn", "to_q"): "attn.to_q",
    ("attn", "to_k"): "attn.to_k",
    ("attn", "to_v"): "attn.to_v",
    ("attn", "add_q_proj"): "attn.add_q_proj",
    ("attn", "add_k_proj"): "attn.add_k_proj",
    ("attn", "add_v_proj"): "attn.add_v_proj",
    ("attn", "to_out"): "attn.to_out.0",
    ("attn", "to_add_out"): "attn.to_add_out",
    ("ff", "proj_in"): "ff.net.0.proj",
    ("ff", "proj_out"): "ff.net.2",
    ("ff_context", "proj_in"): "ff_context.net.0.proj",
    ("ff_context", "proj_out"): "ff_context.net.2",
}
_TOP_MODULES = {
    ("time_embed", "linear_1"): "time_text_embed.timestep_embedder.linear_1",
    ("time_embed", "linear_2"): "time_text_embed.timestep_embedder.linear_2",
    ("pooled_embed", "linear_1"): "time_text_embed.text_embedder.linear_1",
    ("pooled_embed", "linear_2"): "time_text_embed.text_embedder.linear_2",
    ("context_embedder",): "context_embedder",
    ("norm_out", "linear"): "norm_out.linear",
    ("proj_out",): "proj_out",
    ("image_norm_out", "linear"): "image_norm_out.linear",
    ("image_proj_out",): "image_proj_out",
    ("text_proj_out",): "text_proj_out",
    ("adapter_img", "fc_1"): "siglip_adapter_img.fc.0",
    ("adapter_img", "fc_2"): "siglip_adapter_img.fc.2",
    ("adapter_text", "fc_1"): "siglip_adapter_text.fc.0",
    ("adapter_text", "fc_2"): "siglip_adapter_text.fc.2",
}
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


def _linear_key(path: tuple[str, ...], table: dict) -> tuple[str, tuple[int, ...] | None]:
    """(diffusers key, permutation) of a Linear's kernel/bias at `path`."""
    *module, leaf = path
    name = table[tuple(module)]
    return (f"{name}.weight", LINEAR) if leaf == "kernel" else (f"{name}.bias", None)


def tensor_moves(config: MMDiTConfig) -> list[TensorMove]:
    """Every diffusers tensor of a `config` model and where it lands, in our tree's order."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    moves = []
    last = config.num_layers - 1
    for keypath, leaf in flat:
        path = tuple(k.key for k in keypath)
        if path[0] == "blocks":
            name, perm = _linear_key(path[1:], _BLOCK_MODULES)
            moves += [TensorMove(f"transformer_blocks.{i}.{name}", path, perm, i)
                      for i in range(leaf.shape[0])]
        elif path[0] == "final_block":
            name, perm = _linear_key(path[1:], _BLOCK_MODULES)
            moves.append(TensorMove(f"transformer_blocks.{last}.{name}", path, perm))
        else:
            name, perm = _ARRAYS.get(path) or _linear_key(path, _TOP_MODULES)
            moves.append(TensorMove(name, path, perm))
    return moves


def _source_shape(move: TensorMove, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers shape of a tensor whose place in our tree has `shape`."""
    if move.perm is None:
        return shape
    out = [0] * len(shape)
    for ours, theirs in enumerate(move.perm):
        out[theirs] = shape[ours]
    return tuple(out)


def torch_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict layout (key → shape) that a `config` model converts from."""
    leaves = {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in
              jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
    return {m.source: _source_shape(m, leaves[m.target][0 if m.layer is None else 1:])
            for m in tensor_moves(config)}


def fresh_initialiser(config: MMDiTConfig, seed: int = 0):
    """`fresh(move, shape)` for tensors the source lacks: LeCun-normal kernels, zero biases,
    the fixed sin-cos position table, small-normal null tokens (as `MMDiT` initialises)."""
    rng = np.random.default_rng(seed)

    def fresh(move: TensorMove, shape: tuple[int, ...]) -> np.ndarray:
        if move.target == ("pos_embed",):
            return np.asarray(sincos_2d_table(config.width, config.pos_embed_max_size,
                                              config.sample_size // config.patch_size))[None]
        if move.target == ("null_image_embd",):
            return 0.02 * rng.standard_normal(shape, dtype=np.float32)
        if move.target[-1] == "kernel":
            return rng.standard_normal(shape, dtype=np.float32) / np.sqrt(np.prod(shape[:-1]))
        return np.zeros(shape, np.float32)

    return fresh
