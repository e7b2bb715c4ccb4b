"""Converted pipeline folders (written by `unialign-convert pipeline`): reading them.

The folder holds `pipeline.json` (the index), `scheduler.json` and one sub-folder per
component: `transformer/`, `text_encoder/` (T5), `vae/` and `tokenizer/` (its files as
given). `UniAlignPipeline.from_pretrained` (in `unialign_jax.sampling`) runs them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from unialign_jax import files
from unialign_jax.checkpoints import io, registry
from unialign_jax.text.tokenizer import MAX_LENGTH, load_tokenizer, mask_token_id

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
    tokenizer: Any  # a transformers T5 tokenizer with the folder's own pad token
    scheduler: dict  # 'shift', 'num_train_timesteps'
    mask_token_id: int
    path: str
    # Prompt tokens the transformer was trained with (T5 pads to it, no attention mask):
    # the release's 256; a run trained shorter must be sampled at its own length.
    text_length: int = MAX_LENGTH


def read_index(path: str) -> dict:
    if not os.path.isdir(path):
        raise io.CheckpointError(f"pipeline folder not found: {path}")
    try:
        index = files.read_json(os.path.join(path, INDEX_FILE))
    except (FileNotFoundError, ValueError) as e:
        raise io.CheckpointError(f"{path} is not a converted pipeline folder ({e}); convert a "
                                 "diffusers folder with `unialign-convert pipeline SRC DST`") \
            from None
    if index.get("format") != FORMAT:
        raise io.CheckpointError(f"{path}/{INDEX_FILE} is not a {FORMAT} index; convert a "
                                 "diffusers folder with `unialign-convert pipeline SRC DST`")
    return index


def index_text_length(index: dict) -> int:
    """The index's prompt length; folders written before it was recorded are the release's."""
    return int(index.get("text_length", MAX_LENGTH))


def component_paths(path: str) -> dict[str, str]:
    """{component: folder} of a converted pipeline folder."""
    return {k: os.path.join(path, v) for k, v in read_index(path)["components"].items()}


def load_components(path: str, dtype=jnp.float32, *, vae_dtype=jnp.float32, param_dtype=None,
                    shardings=None, attention: str = "auto",
                    activation_sharding=None) -> PipelineComponents:
    """Loads every component of the pipeline folder `path`.

    `dtype` is the compute dtype of the transformer and the text encoder, `vae_dtype` the
    VAE's. Parameters keep their stored dtypes unless `param_dtype` is given for the
    transformer and the text encoder (bf16 halves inference memory). `shardings`,
    `attention` and `activation_sharding` go to each model.
    """
    index = read_index(path)
    where = component_paths(path)
    # Inference keeps the folder's pad token, as the release's pipeline does (training pads
    # with </s>).
    tokenizer = load_tokenizer(where["tokenizer"], pad="folder")
    if mask_token_id(tokenizer) != index["mask_token_id"] or len(tokenizer) != index["vocab_size"]:
        raise io.CheckpointError(f"{where['tokenizer']}: tokenizer differs from the one the "
                                 f"pipeline was converted with ({INDEX_FILE})")
    common = dict(shardings=shardings, activation_sharding=activation_sharding)
    transformer = registry.load_transformer(where["transformer"], dtype, param_dtype=param_dtype,
                                            attention=attention, **common)
    if transformer.config.vocab_size != len(tokenizer):
        raise io.CheckpointError(f"{path}: transformer vocabulary {transformer.config.vocab_size}"
                                 f" differs from the tokenizer length {len(tokenizer)}")
    try:
        scheduler = files.read_json(os.path.join(path, index["scheduler"]))
    except (FileNotFoundError, ValueError) as e:
        raise io.CheckpointError(str(e)) from None
    return PipelineComponents(
        transformer=transformer,
        t5=registry.load_t5(where["text_encoder"], dtype, param_dtype=param_dtype,
                            attention=attention, **common),
        vae=registry.load_vae(where["vae"], vae_dtype, attention=attention,
                              shardings=shardings),
        tokenizer=tokenizer, scheduler=scheduler, mask_token_id=index["mask_token_id"],
        path=os.path.abspath(path), text_length=index_text_length(index))
