"""`unialign-convert t5`: a transformers `T5EncoderModel` folder → a unialign_jax T5 checkpoint.

Optionally writes UniAlignment's learned mask embedding into the mask token's row.
"""

from __future__ import annotations

import os

from flax import nnx

from unialign_convert import param_mapping
from unialign_convert.mask_embedding import DEFAULT_MASK_TOKEN_ID, apply_mask_embedding, read_mask_embedding
from unialign_convert.param_mapping import LINEAR, TensorMove
from unialign_convert.safetensors_io import ConversionError, TensorSource, read_config
from unialign_jax import files
from unialign_jax.checkpoints import io, registry
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
    registry.write_config(out_dir, "t5", cfg, dtype)
    registry.write_conversion(out_dir, {
        "source": os.path.abspath(src), "dtype": dtype,
        "mask_embedding": None if vector is None else {
            "file": os.path.abspath(mask_embedding), "token_id": mask_token_id}})
    io.save_params(out_dir, params)
    return cfg


convert_t5 = files.into_new_folder(write_t5)


def run(args) -> None:
    convert_t5(args.src, args.dst, dtype=args.dtype, mask_embedding=args.mask_embedding,
               mask_token_id=args.mask_token_id, force=args.force)
    print(f"converted the T5 encoder into {args.dst} (load it with unialign_jax.load_t5)")
