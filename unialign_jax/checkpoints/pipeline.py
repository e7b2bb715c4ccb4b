"""Loading a converted pipeline folder (written by `unialign-convert pipeline`).

The folder holds `pipeline.json` (the index), `scheduler.json` and one sub-folder per
component: `transformer/`, `text_encoder/` (T5), `vae/` and `tokenizer/` (its files as given).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from unialign_jax.checkpoints import io
from unialign_jax.checkpoints.t5 import load_t5
from unialign_jax.checkpoints.transformer import load_transformer
from unialign_jax.checkpoints.vae import load_vae
from unialign_jax.text.tokenizer import load_tokenizer, mask_token_id

FORMAT = "unialign_jax.pipeline"
INDEX_FILE = "pipeline.json"
SCHEDULER_FILE = "scheduler.json"
COMPONENT_DIRS = {"transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
                  "tokenizer": "tokenizer"}


@dataclasses.dataclass
class PipelineComponents:
    """Everything the samplers need, loaded and checked against each other."""

    transformer: Any  # unialign_jax.models.mmdit.MMDiT
    t5: Any  # unialign_jax.models.t5.T5Encoder
    vae: Any  # unialign_jax.models.vae.AutoencoderKL
    tokenizer: Any  # a transformers T5 tokenizer, pad = </s>
    scheduler: dict  # 'shift', 'num_train_timesteps'
    mask_token_id: int
    path: str


def read_index(path: str) -> dict:
    if not os.path.isdir(path):
        raise io.CheckpointError(f"pipeline folder not found: {path}")
    index = io.read_json(os.path.join(path, INDEX_FILE))
    if index.get("format") != FORMAT:
        raise io.CheckpointError(f"{path}/{INDEX_FILE} is not a {FORMAT} index; convert a "
                                 "diffusers folder with `unialign-convert pipeline SRC DST`")
    return index


def load_components(path: str, dtype=jnp.float32, *, vae_dtype=jnp.float32,
                    param_dtype=None, shardings=None) -> PipelineComponents:
    """Loads every component of the pipeline folder `path`.

    `dtype` is the compute dtype of the transformer and the text encoder, `vae_dtype` the
    VAE's. Parameters keep their stored dtypes unless `param_dtype` is given for the
    transformer and the text encoder (bf16 halves inference memory). `shardings` is passed
    to each loader.
    """
    index = read_index(path)
    where = {k: os.path.join(path, v) for k, v in index["components"].items()}
    tokenizer = load_tokenizer(where["tokenizer"])
    if mask_token_id(tokenizer) != index["mask_token_id"] or len(tokenizer) != index["vocab_size"]:
        raise io.CheckpointError(f"{where['tokenizer']}: tokenizer differs from the one the "
                                 f"pipeline was converted with ({INDEX_FILE})")
    transformer = load_transformer(where["transformer"], dtype, param_dtype=param_dtype,
                                   shardings=shardings)
    if transformer.config.vocab_size != len(tokenizer):
        raise io.CheckpointError(f"{path}: transformer vocabulary {transformer.config.vocab_size}"
                                 f" differs from the tokenizer length {len(tokenizer)}")
    return PipelineComponents(
        transformer=transformer,
        t5=load_t5(where["text_encoder"], dtype, param_dtype=param_dtype, shardings=shardings),
        vae=load_vae(where["vae"], vae_dtype, shardings=shardings), tokenizer=tokenizer,
        scheduler=io.read_json(os.path.join(path, index["scheduler"])),
        mask_token_id=index["mask_token_id"], path=os.path.abspath(path))


def load_pipeline(path: str, dtype=jnp.float32, *, vae_dtype=jnp.float32, param_dtype=None,
                  shardings=None, **pipeline_kwargs):
    """`UniAlignPipeline` over the components of `path` (keyword arguments such as `mesh`,
    `batch_size` go to the pipeline)."""
    from unialign_jax.sampling.pipeline import UniAlignPipeline

    return UniAlignPipeline(load_components(path, dtype, vae_dtype=vae_dtype,
                                            param_dtype=param_dtype, shardings=shardings),
                            **pipeline_kwargs)
