"""What a run is: typed, nested, frozen sections and dotted `key=value` overrides. Pure
data: nothing here reads a file — config files load through `unialign_configs.load`, the
folders a config names are read by `runs.resolve` — so every floor above can hold a
`TrainConfig`.

A config file defines `get_config()` returning a `TrainConfig` (big_vision style: plain
Python). The run config is made of the models' own configs (`MMDiTConfig`, `T5Config`,
`VAEConfig`) or folder paths, and small sections; each subsystem receives only its
section. Overrides address fields by dotted keys (`optimizer.lr=1e-4`,
`loss.caption_weight=3`, `models.transformer.num_layers=2`) and are type-checked
(`unialign_jax.configlib`); `unialign-train --help` lists every key with its type and
default.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
from jax.sharding import Mesh

from unialign_jax.configlib import JsonConfig
from unialign_jax.data.format.records import KINDS as TASKS
from unialign_jax.diffusion import masked
from unialign_jax.diffusion.alignment_losses import CONTRASTIVE_TEMPERATURE
from unialign_jax.models import lora as lora_layers
from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.models.runtime import Runtime
from unialign_jax.models.t5 import T5Config
from unialign_jax.models.vae import VAEConfig
from unialign_jax.parallel import placed_on
from unialign_jax.text.tokenizer import MAX_LENGTH


@dataclasses.dataclass(frozen=True)
class ModelsConfig(JsonConfig):
    """Where the three models come from: converted folders, or fresh from their configs."""

    # A converted pipeline folder (`unialign-convert pipeline`): sets transformer_path,
    # t5_path, vae_path and tokenizer from its components (explicit paths win).
    pipeline: str | None = None
    # Converted transformer folder in the UniAlignment layout; None: random initialisation
    # of `transformer` (an SD3 checkpoint is ported with `unialign-convert transformer
    # --to unialignment`).
    transformer_path: str | None = None
    # Its configuration when initialised fresh; vocab_size None: the tokenizer's length.
    transformer: MMDiTConfig = MMDiTConfig()
    t5_path: str | None = None            # converted T5 folder; None: random T5 of `t5`
    t5: T5Config = T5Config()
    vae_path: str | None = None           # converted VAE folder; None: random VAE of `vae`
    vae: VAEConfig = VAEConfig()
    tokenizer: str | None = None          # local T5 tokenizer folder


@dataclasses.dataclass(frozen=True)
class ComputeConfig(JsonConfig):
    dtype: str = "bfloat16"               # compute dtype of all models
    param_dtype: str = "float32"          # trained parameters, optimizer state, EMA
    frozen_param_dtype: str = "bfloat16"  # T5 and VAE weights
    # Rematerialisation of each transformer block: 'none', a jax.checkpoint_policies name or
    # a named set of the block's intermediates (unialign_jax.models.remat).
    remat_policy: str = "nothing_saveable"
    # Attention kernel of the transformer and T5 (unialign_jax.models.attention).
    attention: str = "auto"

    def runtime(self, mesh: Mesh) -> Runtime:
        """How the run's models run on `mesh`; each model's storage dtype (trained, frozen
        or a LoRA base) is set where it is built."""
        return placed_on(mesh, Runtime(jnp.dtype(self.dtype), attention=self.attention,
                                       remat_policy=self.remat_policy))


def _task_alias(task: str):
    """`data.t2i_shards` / `data.edit_shards` (the keys before `data.tasks`): set one
    task's folders; () drops the task."""
    def alias(data: "DataConfig", folders) -> "DataConfig":
        return dataclasses.replace(data, tasks={**data.tasks, task: folders})

    return alias


@dataclasses.dataclass(frozen=True)
class DataConfig(JsonConfig):
    # {task: shard folders} of the tasks to train — 't2i', 'edit' (editing and perception),
    # 'compose' — each built by `unialign-data build --kind TASK` (a task with no folders is
    # not trained). The retired keys data.t2i_shards / data.edit_shards set one entry.
    tasks: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Batches of each task per cycle of the mix, {task: weight} (a task not named: 1); the
    # cycle takes the tasks in TASKS order. The release alternates one text-to-image and one
    # editing batch; {'t2i': 3, 'edit': 1} gives three text-to-image steps per editing step.
    # The older tuple form lists weights in TASKS order, e.g. (3, 1).
    task_weights: dict[str, float] | tuple[float, ...] = dataclasses.field(default_factory=dict)
    resolution: int = 512
    max_length: int = MAX_LENGTH          # caption / instruction tokens
    seed: int = 0
    workers: int = 0                      # grain worker processes per host
    # A record that cannot be read or decoded (a shard damaged after its build) stops the
    # run naming its shard and record (False), or is skipped: replaced by the next readable
    # record and counted in the metrics as data_skipped (True).
    skip_corrupt: bool = False
    # Seconds to wait for one batch before failing with an error (a hung data worker or
    # storage); 0 waits forever. A crashed worker fails at once either way.
    worker_timeout_s: float = 600.0
    # {task: held-out shard folders} of the eval loss (run.eval_every), in the form of
    # `tasks`: read in record order, never shuffled (training/evaluation.py).
    eval_tasks: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Read each image's VAE posterior moments from the folders' latents/ (made by
    # `unialign-data latents SHARDS --vae models.vae_path`) instead of encoding the images
    # in every step: the same steps, without the VAE encoder. Every folder of data.tasks and
    # data.eval_tasks needs one, made by this run's VAE and dtypes (else an error).
    cached_latents: bool = False
    # Aspect-ratio buckets: train on folders built with `unialign-data build --buckets`,
    # every batch from one bucket (images of about resolution² pixels at their own aspect);
    # False: the release's square centre crops. Each bucket's shape compiles its own step.
    buckets: bool = False

    ALIASES = {"t2i_shards": _task_alias("t2i"), "edit_shards": _task_alias("edit")}

    def __post_init__(self):
        # One spelling inside: folders as tuples of str, weights as {task: float}, whatever
        # form a config file, an override or a config.json gave.
        tasks, eval_tasks = (
            {str(task): (folders,) if isinstance(folders, str) else tuple(folders)
             for task, folders in dict(mapping).items()}
            for mapping in (self.tasks, self.eval_tasks))
        weights = self.task_weights
        if not isinstance(weights, dict):
            if len(weights) > len(TASKS):
                raise ValueError(f"data.task_weights {tuple(weights)} lists more weights than "
                                 f"the {len(TASKS)} tasks {list(TASKS)}")
            weights = dict(zip(TASKS, weights))
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "eval_tasks", eval_tasks)
        object.__setattr__(self, "task_weights", weights)

    def trained(self) -> list[tuple[str, tuple[str, ...], float]]:
        """(task, shard folders, weight) of each task with folders, in TASKS order: the
        order of the mix's cycle."""
        return [(task, self.tasks[task], float(self.task_weights.get(task, 1.0)))
                for task in TASKS if self.tasks.get(task)]

    def problems(self) -> list[str]:
        out = []
        for key, mapping in (("tasks", self.tasks), ("eval_tasks", self.eval_tasks)):
            unknown = sorted(set(mapping) - set(TASKS))
            if unknown:
                out.append(f"data.{key} names unknown tasks {unknown}; the tasks are "
                           f"{list(TASKS)}")
        weights = self.task_weights
        if set(weights) - set(TASKS) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                for w in weights.values()):
            out.append(f"data.task_weights must map tasks of {list(TASKS)} to positive "
                       f"numbers, got {weights}")
        if not self.trained():
            out.append("no training data: set data.tasks (e.g. \"{'t2i': ('DIR',), 'edit': "
                       "('DIR',)}\") to folders built by `unialign-data build`")
        return out


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(JsonConfig):
    """AdamW (torch's defaults for betas / eps), linear warmup then constant, clipping."""

    lr: float = 3e-5
    warmup_steps: int = 2000
    # After warmup: constant, as the release (0), or a cosine from lr down to 0 at this
    # step; -1: at the run's last step (run.num_steps; none if the run ends in the warmup).
    cosine_end_step: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 2.0
    # The optimizer sees the mean micro-batch gradient times this. The release *sums* its
    # micro-batch gradients (see configs/unialignment_512.py): 12 there reproduces its
    # clipping and AdamW exactly, whatever our mesh. 1: clip and step on the mean.
    gradient_scale: float = 1.0
    # Exponential moving average of the parameters (ours: the release names an EMA but never
    # updates it, and released its raw parameters); None keeps no EMA.
    ema_decay: float | None = 0.9995


@dataclasses.dataclass(frozen=True)
class LossConfig(JsonConfig):
    """The objective of spec section 4: weights and constants."""

    image_weight: float = 1.0
    caption_weight: float = 0.2
    contrastive_weight: float = 0.05
    align_weight: float = 0.1
    block_depth: int = 8                  # block after which alignment features are taken
    null_prompt_prob: float = 0.1
    # Image timesteps: σ from sigmoid(logit_mean + logit_std·u), u ~ N(0, 1); the release's
    # (0, 1). A positive mean trains more at high noise, where a layout is decided.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    contrastive_temperature: float = CONTRASTIVE_TEMPERATURE
    caption_eps: float = masked.SCHEDULE_EPS   # ε of the masked-diffusion schedule
    # "device": contrast within each device's micro-batch, as the release (per GPU, no
    # gather); "global": within the whole global micro-batch (independent of the mesh).
    contrastive_scope: Literal["device", "global"] = "device"
    # Antithetic caption times stratified within each device's micro-batch ("device", the
    # release draws them per GPU) or across the global micro-batch ("global").
    antithetic_scope: Literal["device", "global"] = "device"
    # Without teacher features in the data the alignment terms cannot be computed: refuse
    # to train (False) unless this says to train without them.
    allow_missing_teacher: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig(JsonConfig):
    data: int = 1
    fsdp: int = -1                        # -1: all remaining devices
    tensor: int = 1
    distributed: bool | None = None       # jax.distributed.initialize(); None: from env
    # Multi-host: seconds without a heartbeat after which jax.distributed declares a host
    # dead and stops the others (JAX's default).
    heartbeat_timeout_s: int = 100


@dataclasses.dataclass(frozen=True)
class RunConfig(JsonConfig):
    batch_size: int = 384                 # global, per optimizer step
    micro_batch_per_device: int = 4       # per accumulation step and device
    num_steps: int = 80_000
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 5000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    # Resume from the newest intact checkpoint when newer ones are damaged, with a warning
    # naming the damage ("latest-valid"), or stop ("latest-only").
    resume: Literal["latest-valid", "latest-only"] = "latest-valid"
    # A step whose loss or gradient norm is not finite skips its update (parameters,
    # optimizer state and EMA unchanged) and is counted (metric nonfinite_steps); this many
    # in a row stop the run. Runs with finite losses are unaffected (the release has no
    # guard: one non-finite step spoils its weights for good).
    max_nonfinite_steps: int = 10
    # Every this many steps (and at the last one; 0: never) the held-out eval loss of
    # data.eval_tasks is logged as eval/<term>, and the validation prompts are sampled into
    # WORKDIR/validation/STEP/ — both with the EMA parameters when the run keeps them.
    eval_every: int = 0
    eval_batches: int = 4                 # per eval task (fewer when its shards hold fewer)
    # Rows of one eval batch, for the whole run (all hosts); None: run.batch_size. The eval
    # loss of given weights depends on it, never on the mesh.
    eval_batch_size: int | None = None
    # Prompts / edit inputs sampled at every eval: a .txt file (one prompt a line) or .jsonl
    # ({"prompt", "image" | "images", "seed"}), as `unialign-sample --prompts-file` reads;
    # item i's seed is its own or i.
    validation_prompts: str | None = None
    validation_steps: int | None = None   # sampler steps; None: the release's per task
    validation_guidance: float = 7.0
    # None: the null prompt the run drops instructions to (what its unconditional branch
    # learns), as a pipeline folder of the run records it.
    validation_negative_prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class LoraConfig(JsonConfig):
    """LoRA fine-tuning (`unialign_jax.models.lora`): rank 0 (the default) trains the whole
    transformer; rank r > 0 trains only r-rank factors on the `targets` layers (plus the
    `train_also` tensors), over a frozen base that the checkpoints do not hold (they point
    to it: this section and `models` in the run's config.json)."""

    rank: int = 0
    alpha: float | None = None            # scale alpha / rank; None: alpha = rank (scale 1)
    # Groups (image_attn, text_attn: q/k/v/out of each stream; image_mlp, text_mlp;
    # adapters) or globs over dotted module paths ('blocks.attn.to_q', '*.ff.proj_in',
    # 'text_proj_out'); each must match a linear layer (checked when the model is built).
    targets: tuple[str, ...] = lora_layers.DEFAULT_TARGETS
    init: Literal["kaiming", "gaussian"] = "kaiming"   # A as PEFT draws it; B = 0
    # Parameters also trained in full, by glob over dotted paths ('text_proj_out.*').
    train_also: tuple[str, ...] = ()
    # Storage dtype of the frozen base; None: compute.dtype (every layer casts its weights
    # to it anyway, so the forward pass is unchanged and memory is as small as it can be).
    base_dtype: Literal["float32", "bfloat16"] | None = None
    # The frozen base: a converted pipeline folder (used as models.pipeline) or transformer
    # folder (models.transformer_path). None: the transformer `models` names, or its random
    # initialisation from run.seed; the resolved config records which.
    base: str | None = None

    @property
    def scale(self) -> float:
        return lora_layers.scale(self.rank, self.alpha)

    def problems(self) -> list[str]:
        if self.rank < 0:
            return [f"lora.rank must be >= 0 (0: no LoRA), got {self.rank}"]
        if self.rank == 0:
            unused = [k for k in ("base", "train_also") if getattr(self, k)]
            return [f"lora.{k} is set but lora.rank is 0 (LoRA off)" for k in unused]
        out = []
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"lora.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            out.append("lora.targets is empty: name the layers to adapt")
        return out


@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    models: ModelsConfig = ModelsConfig()
    compute: ComputeConfig = ComputeConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()
    lora: LoraConfig = LoraConfig()

    def validate(self) -> None:
        """Errors that do not depend on devices or files, in the config's own words."""
        problems = []
        for key, value in (("run.batch_size", self.run.batch_size),
                           ("run.micro_batch_per_device", self.run.micro_batch_per_device),
                           ("run.num_steps", self.run.num_steps),
                           ("run.log_every", self.run.log_every),
                           ("run.ckpt_every", self.run.ckpt_every),
                           ("run.keep_checkpoints", self.run.keep_checkpoints),
                           ("run.max_nonfinite_steps", self.run.max_nonfinite_steps),
                           ("run.eval_batches", self.run.eval_batches),
                           ("run.eval_batch_size", self.run.eval_batch_size or 1),
                           ("run.validation_steps", self.run.validation_steps or 1),
                           ("mesh.heartbeat_timeout_s", self.mesh.heartbeat_timeout_s),
                           ("data.max_length", self.data.max_length),
                           ("data.resolution", self.data.resolution)):
            if value < 1:
                problems.append(f"{key} must be at least 1, got {value}")
        if not 0.0 <= self.loss.null_prompt_prob <= 1.0:
            problems.append(f"loss.null_prompt_prob must be in [0, 1], got "
                            f"{self.loss.null_prompt_prob}")
        if self.optimizer.ema_decay is not None and not 0.0 <= self.optimizer.ema_decay < 1.0:
            problems.append(f"optimizer.ema_decay must be in [0, 1) or None, got "
                            f"{self.optimizer.ema_decay}")
        if self.data.worker_timeout_s < 0:
            problems.append(f"data.worker_timeout_s must be >= 0 (0: no limit), got "
                            f"{self.data.worker_timeout_s}")
        end = self.optimizer.cosine_end_step
        if end != -1 and end and end <= self.optimizer.warmup_steps:
            problems.append(f"optimizer.cosine_end_step ({self.optimizer.cosine_end_step}) must "
                            f"be 0 (no decay), -1 (the last step) or a step after the warmup "
                            f"({self.optimizer.warmup_steps} steps)")
        if self.optimizer.warmup_steps < 0:
            problems.append(f"optimizer.warmup_steps must be >= 0, got "
                            f"{self.optimizer.warmup_steps}")
        problems += self.data.problems()
        problems += self.eval_problems()
        unresolved_base = self.lora.base and self.models.transformer_path is None
        if self.models.tokenizer is None and self.models.pipeline is None \
                and not unresolved_base:  # a pipeline folder as lora.base may give it
            problems.append("set models.tokenizer (a local T5 tokenizer folder) or "
                            "models.pipeline")
        problems += self.lora.problems()
        if self.loss.contrastive_weight and self.loss.contrastive_scope == "device" \
                and self.run.micro_batch_per_device < 2:
            problems.append(
                "loss.contrastive_scope='device' contrasts the rows of one device's "
                "micro-batch, and run.micro_batch_per_device=1 leaves no negatives: the "
                "contrastive loss would be 0 throughout. Use a micro-batch of at least 2 (the "
                "release's is 4), loss.contrastive_scope='global', or "
                "loss.contrastive_weight=0")
        if self.data.cached_latents and self.data.buckets:
            problems.append("data.cached_latents and data.buckets together are not supported "
                            "yet (a cache holds one latent shape); set one of them to False")
        if self.data.cached_latents and not (self.models.vae_path or self.models.pipeline):
            problems.append("data.cached_latents needs the VAE the latents were computed "
                            "with: set models.vae_path (a converted VAE folder) or "
                            "models.pipeline")
        if problems:
            raise ValueError("invalid config:\n  " + "\n  ".join(problems))

    def eval_problems(self) -> list[str]:
        """run.eval_every and what it evaluates: both set, or neither."""
        asked = [k for k, v in (("data.eval_tasks", self.data.eval_tasks),
                                ("run.validation_prompts", self.run.validation_prompts)) if v]
        if self.run.eval_every < 0:
            return [f"run.eval_every must be >= 0 (0: no eval), got {self.run.eval_every}"]
        if self.run.eval_every and not asked:
            return [f"run.eval_every={self.run.eval_every} has nothing to evaluate: set "
                    "data.eval_tasks (held-out shard folders) and/or run.validation_prompts"]
        if asked and not self.run.eval_every:
            return [f"{' and '.join(asked)} set but run.eval_every is 0 (no eval): set it to "
                    "the steps between evals"]
        return []

