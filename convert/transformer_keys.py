"""Key mapping between diffusers' SD3 / UniAlignment state dicts and our parameter tree.

The mapping is derived from the abstract (shape-only) model, so it covers exactly the
parameters that `MMDiT` has for a given configuration — nothing is listed by hand twice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
# Free-standing arrays: our path → (diffusers key, layout kind).
_ARRAYS = {
    ("pos_embed",): ("pos_embed.pos_embed", "copy"),
    ("patch_embed", "kernel"): ("pos_embed.proj.weight", "conv"),
    ("patch_embed", "bias"): ("pos_embed.proj.bias", "copy"),
    ("null_image_embd",): ("null_image_embd", "copy"),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One diffusers tensor and where it lands: `path` in our tree, row `layer` if stacked."""

    torch_key: str
    path: tuple[str, ...]
    layer: int | None
    kind: str  # "linear" (transpose), "conv" (OIHW → HWIO) or "copy"
    shape: tuple[int, ...]  # the shape in our tree, without the layer axis

    @property
    def torch_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return self.shape[::-1]
        if self.kind == "conv":
            return (self.shape[3], self.shape[2], self.shape[0], self.shape[1])
        return self.shape

    def to_ours(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return array.T
        if self.kind == "conv":
            return array.transpose(2, 3, 1, 0)
        return array


def abstract_params(config: MMDiTConfig) -> dict:
    """Shapes and dtypes of the model's parameter tree, without allocating it."""
    model = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


def _module_key(path: tuple[str, ...], table: dict) -> tuple[str, str]:
    """(diffusers key, kind) of a Linear's kernel/bias at `path`."""
    *module, leaf = path
    name = table[tuple(module)]
    return f"{name}.{'weight' if leaf == 'kernel' else 'bias'}", "linear" if leaf == "kernel" else "copy"


def tensor_specs(config: MMDiTConfig) -> list[TensorSpec]:
    """Every diffusers tensor of a `config` model, in our tree's order."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    specs = []
    last = config.num_layers - 1
    for keypath, leaf in flat:
        path = tuple(k.key for k in keypath)
        shape = tuple(leaf.shape)
        if path[0] == "blocks":
            name, kind = _module_key(path[1:], _BLOCK_MODULES)
            specs += [TensorSpec(f"transformer_blocks.{i}.{name}", path, i, kind, shape[1:])
                      for i in range(shape[0])]
        elif path[0] == "final_block":
            name, kind = _module_key(path[1:], _BLOCK_MODULES)
            specs.append(TensorSpec(f"transformer_blocks.{last}.{name}", path, None, kind, shape))
        elif path in _ARRAYS:
            name, kind = _ARRAYS[path]
            specs.append(TensorSpec(name, path, None, kind, shape))
        else:
            name, kind = _module_key(path, _TOP_MODULES)
            specs.append(TensorSpec(name, path, None, kind, shape))
    return specs


def torch_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict layout (key → shape) that a `config` model converts from."""
    return {s.torch_key: s.torch_shape for s in tensor_specs(config)}


def fresh_value(spec: TensorSpec, config: MMDiTConfig, rng: np.random.Generator) -> np.ndarray:
    """A new value for a tensor the source lacks: LeCun-normal kernels, zero biases, the
    fixed sin-cos position table, small-normal null tokens (as `MMDiT`'s own initialisers)."""
    from unialign_jax.models.embeddings import sincos_2d_table

    if spec.path == ("pos_embed",):
        return np.asarray(sincos_2d_table(config.width, config.pos_embed_max_size,
                                          config.sample_size // config.patch_size))[None]
    if spec.path == ("null_image_embd",):
        return 0.02 * rng.standard_normal(spec.shape, dtype=np.float32)
    if spec.path[-1] == "kernel":
        fan_in = int(np.prod(spec.shape[:-1]))
        return rng.standard_normal(spec.shape, dtype=np.float32) / np.sqrt(fan_in)
    return np.zeros(spec.shape, np.float32)


def empty_tree(config: MMDiTConfig, dtype) -> dict:
    """Uninitialised host arrays for the whole output tree: the converter's one copy."""
    return jax.tree.map(lambda a: np.empty(a.shape, jnp.dtype(dtype)), abstract_params(config))
