"""`unialign-convert t5`: a transformers `T5EncoderModel` folder → a unialign_jax T5 checkpoint.

Optionally writes UniAlignment's learned mask embedding into the mask token's row.
"""

from __future__ import annotations

import os

from flax import nnx

from convert import param_mapping
from convert.mask_embedding import DEFAULT_MASK_TOKEN_ID, apply_mask_embedding, read_mask_embedding
from convert.param_mapping import LINEAR, TensorMove
from convert.safetensors_io import ConversionError, TensorSource, read_config
from unialign_jax.checkpoints import io, module_io
from unialign_jax.checkpoints.t5 import FORMAT
from unialign_jax.models.t5 import T5Config, T5Encoder

EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either may be stored


def config_from_transformers(hf: dict, where: str) -> T5Config:
    """Our config from a transformers T5 `config.json`; only T5 v1.1 encoders are accepted."""
    archs = hf.get("architectures") or ["T5EncoderModel"]
    if hf.get("model_type") != "t5" or "T5EncoderModel" not in archs:
        raise ConversionError(f"{where}: expected a T5EncoderModel, found model_type "
                              f"{hf.get('model_type')!r}, architectures {archs}")
    if hf.get("feed_forward_proj") != "gated-gelu":
        raise ConversionError(f"{where}: feed_forward_proj {hf.get('feed_forward_proj')!r} is "
                              "not T5 v1.1's 'gated-gelu'")
    try:
        return T5Config(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"],
            head_dim=hf["d_kv"], d_ff=hf["d_ff"], num_layers=hf["num_layers"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))
    except KeyError as e:
        raise ConversionError(f"{where}: config.json lacks {e}") from None


def tensor_moves(cfg: T5Config, source: TensorSource) -> list[TensorMove]:
    """Where every tensor of the transformers state dict goes in `T5Encoder`'s parameters."""
    embedding = next((k for k in EMBEDDING_KEYS if k in source), EMBEDDING_KEYS[0])
    moves = [
        TensorMove(embedding, ("embedding",)),
        TensorMove("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                   ("relative_attention_bias",)),
        TensorMove("encoder.final_layer_norm.weight", ("final_norm",)),
    ]
    for i in range(cfg.num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
        moves += [TensorMove(f"{attn}.SelfAttention.{n}.weight",
                             ("blocks", "attention", n, "kernel"), LINEAR, i) for n in "qkvo"]
        moves += [TensorMove(f"{ffn}.DenseReluDense.{n}.weight", ("blocks", "ffn", n, "kernel"),
                             LINEAR, i) for n in ("wi_0", "wi_1", "wo")]
        moves += [TensorMove(f"{attn}.layer_norm.weight", ("blocks", "attention_norm"), None, i),
                  TensorMove(f"{ffn}.layer_norm.weight", ("blocks", "ffn_norm"), None, i)]
    return moves


def write_t5(src: str, out_dir: str, *, dtype: str = "float32", mask_embedding: str | None = None,
             mask_token_id: int = DEFAULT_MASK_TOKEN_ID) -> T5Config:
    """Converts the T5 folder `src` into the existing folder `out_dir` (no atomicity here)."""
    cfg = config_from_transformers(read_config(src), src)
    vector = read_mask_embedding(mask_embedding, cfg.d_model) if mask_embedding else None
    source = TensorSource.from_folder(src, "model")
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    params = param_mapping.assemble(
        source, tensor_moves(cfg, source), param_mapping.param_shapes(abstract),
        param_mapping.output_dtype(dtype), ignored=EMBEDDING_KEYS, desc="T5 tensors")
    if vector is not None:
        apply_mask_embedding(params["embedding"], vector, mask_token_id)
    module_io.write_config(out_dir, FORMAT, cfg.to_dict(), dtype)
    io.write_json(os.path.join(out_dir, "conversion.json"), {
        "source": os.path.abspath(src), "dtype": dtype,
        "mask_embedding": None if vector is None else {
            "file": os.path.abspath(mask_embedding), "token_id": mask_token_id}})
    io.save_params(out_dir, params)
    return cfg


def convert_t5(src: str, dst: str, *, dtype: str = "float32", mask_embedding: str | None = None,
               mask_token_id: int = DEFAULT_MASK_TOKEN_ID, force: bool = False) -> T5Config:
    """Converts `src` into a new checkpoint folder `dst`, written atomically."""
    with io.atomic_output_dir(dst, force) as tmp:
        return write_t5(src, tmp, dtype=dtype, mask_embedding=mask_embedding,
                        mask_token_id=mask_token_id)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "t5", help="T5 v1.1 text encoder (transformers T5EncoderModel folder)",
        description="Convert a transformers T5EncoderModel folder (config.json + "
                    "model.safetensors, or sharded with model.safetensors.index.json) into a "
                    "unialign_jax T5 checkpoint loadable with unialign_jax.load_t5.")
    p.add_argument("src", metavar="SRC", help="transformers T5EncoderModel folder")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=param_mapping.DTYPE_NAMES, default="float32",
                   help="stored parameter dtype (default: %(default)s)")
    p.add_argument("--mask-embedding", metavar="FILE",
                   help="vector (.pth torch tensor as released, .safetensors or .npy) that "
                        "replaces the mask token's input-embedding row")
    p.add_argument("--mask-token-id", type=int, default=DEFAULT_MASK_TOKEN_ID,
                   help="row replaced by --mask-embedding (default: %(default)s, <extra_id_0>)")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.set_defaults(func=lambda a: convert_t5(a.src, a.dst, dtype=a.dtype,
                                             mask_embedding=a.mask_embedding,
                                             mask_token_id=a.mask_token_id, force=a.force))
