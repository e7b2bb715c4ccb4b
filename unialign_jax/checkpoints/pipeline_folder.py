"""Pipeline folders (`unialign-convert pipeline`, `from-run`, `save_pretrained`): their index,
their scheduler settings, and loading them.

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
from unialign_jax.configlib import JsonConfig
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


@dataclasses.dataclass(frozen=True)
class PipelineIndex(JsonConfig):
    """`pipeline.json`, the index of a pipeline folder: the one reader and writer of the
    file, for every folder that writes one (`unialign-convert pipeline` and `from-run`,
    `UniAlignPipeline.save_pretrained`). `trained_with`'s fields sit at the file's top
    level; what an older folder lacks takes these defaults."""

    format: str = FORMAT
    source: str | None = None                 # what it was made from
    layout: str | None = None                 # 'sd3', 'unialignment', 'training_run', 'saved'
    components: dict[str, str] = dataclasses.field(default_factory=lambda: dict(COMPONENT_DIRS))
    scheduler: str = SCHEDULER_FILE
    vocab_size: int | None = None             # the tokenizer's length
    mask_token_id: int | None = None
    mask_embedding: str | None = None         # the file written into the T5 mask row
    dtype: str | None = None                  # stored dtype of the transformer and T5
    vae_dtype: str | None = None
    transformer_initialised: tuple[str, ...] = ()   # tensors an SD3 port drew fresh
    training_run: dict | None = None          # from-run: {'run', 'step', 'weights'}
    frozen: dict | None = None                # from-run: where its T5 and VAE came from
    trained_with: TrainedWith = TrainedWith()

    @classmethod
    def read(cls, path: str) -> "PipelineIndex":
        """The index of the pipeline folder `path`; a clear error for anything else."""
        if not os.path.isdir(path):
            raise io.CheckpointError(f"pipeline folder not found: {path}")
        try:
            index = files.read_json(os.path.join(path, INDEX_FILE))
        except (FileNotFoundError, ValueError) as e:
            raise io.CheckpointError(f"{path} is not a converted pipeline folder ({e}); convert "
                                     "a diffusers folder with `unialign-convert pipeline SRC "
                                     "DST`") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise io.CheckpointError(f"{path}/{INDEX_FILE} is not a {FORMAT} index; convert a "
                                     "diffusers folder with `unialign-convert pipeline SRC DST`")
        trained = {f.name: index.pop(f.name) for f in dataclasses.fields(TrainedWith)
                   if f.name in index}
        try:
            return cls.from_dict({**index, "trained_with": TrainedWith(**trained)})
        except (TypeError, ValueError) as e:
            raise io.CheckpointError(f"{path}/{INDEX_FILE}: {e}") from None

    def write(self, path: str) -> None:
        fields = {k: v for k, v in self.to_dict().items() if k != "trained_with"}
        files.write_json(os.path.join(path, INDEX_FILE),
                         {**fields, **dataclasses.asdict(self.trained_with)})

    def paths(self, path: str) -> dict[str, str]:
        """{component: folder} in the pipeline folder `path`."""
        return {k: os.path.join(path, v) for k, v in self.components.items()}


def component_paths(path: str) -> dict[str, str]:
    """{component: folder} of a converted pipeline folder."""
    return PipelineIndex.read(path).paths(path)


def write_scheduler(path: str, scheduler: dict) -> None:
    """The sampler settings ('shift', 'num_train_timesteps') of the pipeline folder `path`."""
    files.write_json(os.path.join(path, SCHEDULER_FILE), dict(scheduler))


def read_scheduler(path: str, index: PipelineIndex | None = None) -> dict:
    """The sampler settings of the pipeline folder `path` (the file its index names)."""
    index = index or PipelineIndex.read(path)
    try:
        return files.read_json(os.path.join(path, index.scheduler))
    except (FileNotFoundError, ValueError) as e:
        raise io.CheckpointError(str(e)) from None


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


def load_components(path: str, runtime: Runtime = Runtime(), *,
                    vae_dtype=jnp.float32) -> PipelineComponents:
    """Loads every component of the pipeline folder `path`: the transformer and the text
    encoder run as `runtime` says (a `param_dtype` there, e.g. bf16, halves inference
    memory), the VAE too but in `vae_dtype` and with its weights as stored."""
    index = PipelineIndex.read(path)
    where = index.paths(path)
    # Inference keeps the folder's pad token, as the release's pipeline does (training pads
    # with </s>).
    tokenizer = load_tokenizer(where["tokenizer"], pad="folder")
    if mask_token_id(tokenizer) != index.mask_token_id or len(tokenizer) != index.vocab_size:
        raise io.CheckpointError(f"{where['tokenizer']}: tokenizer differs from the one the "
                                 f"pipeline was converted with ({INDEX_FILE})")
    transformer = registry.load_model("transformer", where["transformer"], runtime)
    if transformer.config.vocab_size != len(tokenizer):
        raise io.CheckpointError(f"{path}: transformer vocabulary {transformer.config.vocab_size}"
                                 f" differs from the tokenizer length {len(tokenizer)}")
    scheduler = read_scheduler(path, index)
    return PipelineComponents(
        transformer=transformer,
        t5=registry.load_model("t5", where["text_encoder"], runtime),
        vae=registry.load_model("vae", where["vae"], vae_runtime(runtime, vae_dtype)),
        tokenizer=tokenizer, scheduler=scheduler, mask_token_id=index.mask_token_id,
        path=os.path.abspath(path), trained_with=index.trained_with)


def vae_runtime(runtime: Runtime, vae_dtype) -> Runtime:
    """The VAE's runtime in a pipeline: the models' own, in `vae_dtype`, weights as stored
    (SD3 runs its VAE in float32)."""
    return dataclasses.replace(runtime, dtype=vae_dtype, param_dtype=None)
