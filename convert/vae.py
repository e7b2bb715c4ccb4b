"""`unialign-convert vae`: a diffusers `AutoencoderKL` folder (SD3's VAE) → a unialign_jax VAE."""

from __future__ import annotations

import os

from flax import nnx, traverse_util

from unialign_convert import param_mapping
from unialign_convert.param_mapping import CONV, LINEAR, TensorMove
from unialign_convert.safetensors_io import ConversionError, TensorSource, read_config
from unialign_jax import files
from unialign_jax.checkpoints import io, registry
from unialign_jax.models.vae import AutoencoderKL, VAEConfig

# Our module names that diffusers spells differently (its one-element ModuleLists).
_RENAMES = {"downsampler": "downsamplers.0.conv", "upsampler": "upsamplers.0.conv",
            "attention": "attentions.0", "to_out": "to_out.0", "kernel": "weight",
            "scale": "weight"}


def config_from_diffusers(d: dict, where: str) -> VAEConfig:
    """Our config from a diffusers `config.json`; only SD3-style AutoencoderKL is accepted."""
    if d.get("_class_name") != "AutoencoderKL":
        raise ConversionError(f"{where}: expected an AutoencoderKL, found {d.get('_class_name')!r}")
    differs = {  # field → True when it is not what SD3's VAE (and our model) uses
        "use_quant_conv": d.get("use_quant_conv", True) is not False,
        "use_post_quant_conv": d.get("use_post_quant_conv", True) is not False,
        "act_fn": d.get("act_fn", "silu") != "silu",
        "mid_block_add_attention": d.get("mid_block_add_attention", True) is not True,
        "down_block_types": set(d.get("down_block_types", ())) - {"DownEncoderBlock2D"},
        "up_block_types": set(d.get("up_block_types", ())) - {"UpDecoderBlock2D"}}
    unsupported = sorted(k for k, bad in differs.items() if bad)
    if unsupported:
        raise ConversionError(f"{where}: not an SD3-style VAE (no quant convs, SiLU, plain "
                              f"encoder/decoder blocks, mid-block attention); differs in "
                              f"{unsupported}")
    try:
        return VAEConfig(
            in_channels=d["in_channels"], out_channels=d["out_channels"],
            latent_channels=d["latent_channels"], block_out_channels=d["block_out_channels"],
            layers_per_block=d["layers_per_block"], norm_num_groups=d["norm_num_groups"],
            scaling_factor=d["scaling_factor"], shift_factor=d.get("shift_factor") or 0.0)
    except KeyError as e:
        raise ConversionError(f"{where}: config.json lacks {e}") from None


def torch_key(path: tuple) -> str:
    """diffusers' state-dict key of one of our parameters (its path in the nested dict)."""
    return ".".join(_RENAMES.get(str(p), str(p)) for p in path)


def tensor_moves(abstract_params: dict) -> list[TensorMove]:
    moves = []
    for path, leaf in traverse_util.flatten_dict(abstract_params).items():
        perm = {4: CONV, 2: LINEAR}[leaf.ndim] if path[-1] == "kernel" else None
        moves.append(TensorMove(torch_key(path), path, perm))
    return moves


def write_vae(src: str, out_dir: str, *, dtype: str = "float32") -> VAEConfig:
    """Converts the VAE folder `src` into the existing folder `out_dir` (no atomicity here)."""
    cfg = config_from_diffusers(read_config(src), src)
    source = TensorSource.from_folder(src, "diffusion_pytorch_model")
    shapes = param_mapping.param_shapes(
        nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
    params = param_mapping.assemble(source, tensor_moves(shapes), shapes,
                                    param_mapping.output_dtype(dtype), desc="VAE tensors")
    registry.write_config(out_dir, "vae", cfg, dtype)
    registry.write_conversion(out_dir, {"source": os.path.abspath(src), "dtype": dtype})
    io.save_params(out_dir, params)
    return cfg


convert_vae = files.into_new_folder(write_vae)


def run(args) -> None:
    convert_vae(args.src, args.dst, dtype=args.dtype, force=args.force)
    print(f"converted the VAE into {args.dst} (load it with unialign_jax.load_vae)")
