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
from unialign_jax.models.runtime import Runtime
from unialign_jax.text.tokenizer import MAX_LENGTH, load_tokenizer, mask_token_id

FORMAT = "unialign_jax.pipeline"
INDEX_FILE = "pipeline.json"
SCHEDULER_FILE = "scheduler.json"
COMPONENT_DIRS = {"transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
                  "tokenizer": "tokenizer"}


# The negative prompt the release samples with (its infer.py and SemGen script; the pipeline
# class alone defaults to "").
RELEASE_NEGATIVE_PROMPT = (
    "low quality, blurry, low resolution, backlit, cartoon, animated, deformed, "
    "oversaturated, undersaturated, out of frame")
# The release trains at 512 px and its infer.py and SemGen script sample at 512.
RELEASE_RESOLUTION = 512


@dataclasses.dataclass(frozen=True)
class TrainedWith:
    """What a transformer was trained with, recorded in `pipeline.json` so that sampling
    follows it by default: the prompt length T5 pads to (no attention mask, so a model
    trained on 8 tokens sees a text stream of mostly padding at 256), the image side, and a
    negative prompt its unconditional branch knows. A field a folder does not record (one
    written before it was) is the release's."""

    text_length: int = MAX_LENGTH
    resolution: int = RELEASE_RESOLUTION
    negative_prompt: str = RELEASE_NEGATIVE_PROMPT

    @classmethod
    def from_index(cls, index: dict) -> "TrainedWith":
        return cls(**{f.name: index[f.name] for f in dataclasses.fields(cls) if f.name in index})

    def as_index(self) -> dict:
        """The index entries that record it."""
        return dataclasses.asdict(self)


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
    trained_with: TrainedWith = TrainedWith()


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


def component_paths(path: str) -> dict[str, str]:
    """{component: folder} of a converted pipeline folder."""
    return {k: os.path.join(path, v) for k, v in read_index(path)["components"].items()}


def load_components(path: str, runtime: Runtime = Runtime(), *,
                    vae_dtype=jnp.float32) -> PipelineComponents:
    """Loads every component of the pipeline folder `path`: the transformer and the text
    encoder run as `runtime` says (a `param_dtype` there, e.g. bf16, halves inference
    memory), the VAE too but in `vae_dtype` and with its weights as stored."""
    index = read_index(path)
    where = component_paths(path)
    # Inference keeps the folder's pad token, as the release's pipeline does (training pads
    # with </s>).
    tokenizer = load_tokenizer(where["tokenizer"], pad="folder")
    if mask_token_id(tokenizer) != index["mask_token_id"] or len(tokenizer) != index["vocab_size"]:
        raise io.CheckpointError(f"{where['tokenizer']}: tokenizer differs from the one the "
                                 f"pipeline was converted with ({INDEX_FILE})")
    transformer = registry.load_model("transformer", where["transformer"], runtime)
    if transformer.config.vocab_size != len(tokenizer):
        raise io.CheckpointError(f"{path}: transformer vocabulary {transformer.config.vocab_size}"
                                 f" differs from the tokenizer length {len(tokenizer)}")
    try:
        scheduler = files.read_json(os.path.join(path, index["scheduler"]))
    except (FileNotFoundError, ValueError) as e:
        raise io.CheckpointError(str(e)) from None
    return PipelineComponents(
        transformer=transformer,
        t5=registry.load_model("t5", where["text_encoder"], runtime),
        vae=registry.load_model("vae", where["vae"], vae_runtime(runtime, vae_dtype)),
        tokenizer=tokenizer, scheduler=scheduler, mask_token_id=index["mask_token_id"],
        path=os.path.abspath(path), trained_with=TrainedWith.from_index(index))


def vae_runtime(runtime: Runtime, vae_dtype) -> Runtime:
    """The VAE's runtime in a pipeline: the models' own, in `vae_dtype`, weights as stored
    (SD3 runs its VAE in float32)."""
    return dataclasses.replace(runtime, dtype=vae_dtype, param_dtype=None)
