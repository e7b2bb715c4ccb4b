"""Training work dirs (`unialign-train --workdir`) read as models, without the trainer.

A work dir holds `config.json` (the run's `TrainConfig.to_dict()`, paths resolved) and
`checkpoints/STEP/state` (Orbax: step, params, opt_state, ema_params, rng). Only the trained
transformer is checkpointed, and only its parameters (EMA or raw) are read here; steps are
the intact ones (`training_steps.valid_steps`) and the arrays read are checked against the
fingerprint saved with them.

Every model is made by the trainer's own `runs.builder.run_model`: the frozen T5 and VAE
from the folders the run named (`models.t5_path`, `models.vae_path`), or — when the run
initialised them at random (the quickstart, tests) — redrawn from the run's seed table in
the dtype the run made them in (tests/test_from_run.py checks the result against the
trainer's `build_models`). Decision: the trainer does not store its frozen models — a random
one is cheaper to redraw than to write at every run start, and real runs name converted
folders. The tokenizer is the run's, padding with `</s>` as training does.

A LoRA run (`lora.rank > 0`) checkpoints only its factors (and `train_also` tensors); its
transformer is the frozen base its config points to (`models.transformer_path`, or the
random initialisation of `run.seed`), in the dtype it trained over (`lora.base_dtype`),
with the trained tensors set and the factors merged in.

The run config is read as the trainer wrote it, a `TrainConfig`: the reader holds the
trainer's knowledge of a run (seeds, model configs, dtypes, the builder), not a copy of it."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from unialign_jax import files
from unialign_jax.checkpoints import io, registry, training_steps
from unialign_jax.checkpoints.pipeline_folder import (PipelineComponents, PipelineIndex, TrainedWith,
                                               read_scheduler, vae_runtime)
from unialign_jax.checkpoints.training_steps import CHECKPOINT_DIR
from unialign_jax.diffusion import flow
from unialign_jax.models import lora
from unialign_jax.models.runtime import Runtime
from unialign_jax.runs.config import TrainConfig
from unialign_jax.runs.builder import (SEED_OFFSETS, fixed_buffers, frozen_config,
                                       run_model, stored_dtype, transformer_config,
                                       wrap_factors)
from unialign_jax.text.tokenizer import NULL_PROMPT, load_tokenizer, mask_token_id

RUN_CONFIG_FILE = "config.json"
STATE_ITEM = "state"
WEIGHTS = ("ema", "raw")
_STATE_KEYS = {"ema": "ema_params", "raw": "params"}
_FOLDERS = {"transformer": "transformer_path", "t5": "t5_path", "vae": "vae_path"}


def is_training_run(path: str) -> bool:
    """Whether `path` is a training work dir: a run config.json and a checkpoints folder."""
    if not os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return False
    config = files.read_json_or_none(os.path.join(path, RUN_CONFIG_FILE))
    return isinstance(config, dict) and {"models", "compute", "run"} <= set(config)


def read_run_config(workdir: str) -> TrainConfig:
    """The run's config.json (written by `write_run_config`); a clear error for anything
    that is not a run."""
    if not is_training_run(workdir):
        raise io.CheckpointError(
            f"{workdir} is not a training work dir (expected {RUN_CONFIG_FILE} written by "
            f"unialign-train and a {CHECKPOINT_DIR}/ folder)")
    return TrainConfig.from_dict(files.read_json(os.path.join(workdir, RUN_CONFIG_FILE)))


def write_run_config(workdir, cfg: TrainConfig) -> None:
    """The resolved config a run records in its work dir (a local path or an `epath`),
    rewritten only when it changed."""
    files.write_text_if_changed(os.path.join(workdir, RUN_CONFIG_FILE),
                                files.dumps(cfg.to_dict()))


def resolve_step(workdir: str, step: int | None = None) -> int:
    """`step`, checked to be saved and intact, or the latest intact one
    (`training_steps.valid_steps`: a step damaged after its commit is never used)."""
    steps = training_steps.valid_steps(workdir)
    if step is None and steps:
        return steps[-1]
    if step in steps:
        return step
    damaged = {c.step: c for c in training_steps.step_checks(workdir) if not c.valid}
    if step in damaged:
        raise io.CheckpointError(f"{workdir}: checkpoint of step {step} is damaged: "
                                 f"{damaged[step].describe()}")
    if step is None:
        raise io.CheckpointError(f"{workdir}: no intact checkpoint in {CHECKPOINT_DIR}/"
                                 + (f" (damaged: {sorted(damaged)})" if damaged else " yet"))
    raise io.CheckpointError(f"{workdir}: no checkpoint of step {step}; saved steps: {steps}")


def _state_path(workdir: str, step: int) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), STATE_ITEM)


def _state_keys(workdir: str, step: int) -> set[str]:
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(_state_path(workdir, step)).item_metadata.tree
    return {k for k, v in tree.items() if v is not None}


def resolve_weights(workdir: str, step: int, weights: str | None = None) -> str:
    """'ema' or 'raw': as asked (EMA must exist), or by default EMA when the run keeps one."""
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    has_ema = _STATE_KEYS["ema"] in _state_keys(workdir, step)
    if weights == "ema" and not has_ema:
        raise io.CheckpointError(f"{workdir}: step {step} holds no EMA parameters (the run "
                                 "had optimizer.ema_decay=None); use the raw weights")
    return weights or ("ema" if has_ema else "raw")


def _path(config: TrainConfig, key: str, workdir: str) -> str | None:
    """A folder the run's config names (models.KEY), checked to exist."""
    path = getattr(config.models, key)
    if path and not os.path.exists(path):
        raise io.CheckpointError(f"{workdir}/{RUN_CONFIG_FILE}: models.{key} = {path} does "
                                 "not exist (moved since training?)")
    return path


def run_tokenizer(workdir: str, config: TrainConfig | None = None):
    """The run's tokenizer, padding with `</s>` as training did."""
    config = config or read_run_config(workdir)
    path = _path(config, "tokenizer", workdir)
    if not path:
        raise io.CheckpointError(f"{workdir}/{RUN_CONFIG_FILE}: models.tokenizer is not set")
    return load_tokenizer(path)


def model_config(workdir: str, kind: str, vocab_size: int, config: TrainConfig | None = None):
    """The run's `kind` config, as the trainer built it (its folder checked to exist)."""
    config = config or read_run_config(workdir)
    _path(config, _FOLDERS[kind], workdir)
    if kind == "transformer":
        return transformer_config(config.models, vocab_size)
    return frozen_config(config.models, kind)


def frozen_source(config: TrainConfig, kind: str) -> dict:
    """Where the run's frozen `kind` ('t5' or 'vae') comes from: {'folder': path} or
    {'seed': s, 'param_dtype': d} of its random initialisation."""
    path = getattr(config.models, _FOLDERS[kind])
    if path:
        return {"folder": os.path.abspath(path)}
    return {"seed": config.run.seed + SEED_OFFSETS[kind],
            "param_dtype": str(stored_dtype(config.compute, config.lora, kind))}


def frozen_module(workdir: str, kind: str, model_config, runtime: Runtime = Runtime(), *,
                  config: TrainConfig | None = None) -> nnx.Module:
    """The run's frozen T5 or VAE (`runs.builder.run_model`): its folder read as stored (or
    as the runtime's `param_dtype`), or its random initialisation redrawn in the dtype the
    run made it in, then cast to the runtime's `param_dtype` when it sets one."""
    config = config or read_run_config(workdir)
    folder = _path(config, _FOLDERS[kind], workdir)
    if folder:
        stored = registry.read_config(folder, kind)[1]
        return run_model(kind, model_config, runtime.storing(stored), folder=folder)
    made_in = dataclasses.replace(runtime, param_dtype=stored_dtype(config.compute, config.lora,
                                                                    kind))
    return _cast(run_model(kind, model_config, made_in, seed=config.run.seed),
                 runtime.param_dtype)


def _cast(module: nnx.Module, param_dtype) -> nnx.Module:
    """`module` with its floating-point variables cast to `param_dtype` (None: as they are)."""
    if param_dtype is not None:
        nnx.update(module, jax.tree.map(lambda x: x.astype(param_dtype)
                                        if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                        nnx.state(module)))
    return module


def trained_params(workdir: str, step: int, weights: str, target: dict) -> dict:
    """The transformer parameters of `step` ("ema" or "raw") read into `target` (a pure dict
    of ShapeDtypeStructs: host numpy arrays, or placed arrays where a leaf has a sharding);
    nothing else of the train state is read."""
    key = _STATE_KEYS[weights]
    where = f"{workdir} step {step} {key}"
    tree = io.read_tree(_state_path(workdir, step), {key: target}, partial=True, where=where)
    recorded = training_steps.recorded_fingerprint(workdir, step)
    bad = training_steps.fingerprint_mismatches(tree, recorded) if recorded else []
    if bad:
        raise io.CheckpointError(f"{where}: array data differ from what was saved (damaged "
                                 f"after the save?): {', '.join(bad[:5])}")
    return tree[key]


def lora_tree(workdir: str, step: int, weights: str, model_config,
              config: TrainConfig | None = None) -> dict:
    """What a LoRA run trained, at `step` (EMA or raw): its factor tree and `train_also`
    tensors, as host numpy arrays in the run's param_dtype."""
    config = config or read_run_config(workdir)
    section, param_dtype = config.lora, jnp.dtype(config.compute.param_dtype)
    if not section.rank:
        raise io.CheckpointError(f"{workdir} is not a LoRA run (lora.rank is 0)")
    abstract = run_model("transformer", model_config, Runtime(), abstract=True)
    wrap_factors(abstract, section, param_dtype)
    target = nnx.to_pure_dict(nnx.state(abstract, lora.trained_filter(section.train_also)))
    return trained_params(workdir, step, weights, io.abstract_like(target, param_dtype))


def _lora_transformer(workdir: str, step: int, weights: str, model_config, runtime: Runtime,
                      config: TrainConfig) -> nnx.Module:
    """A LoRA run's transformer: its base as trained over, then cast to the runtime's
    `param_dtype`, with the `train_also` tensors set and scale·A·B merged into the adapted
    kernels."""
    section, param_dtype = config.lora, runtime.param_dtype
    made_in = dataclasses.replace(
        runtime, param_dtype=stored_dtype(config.compute, section, "transformer"))
    module = _cast(run_model("transformer", model_config, made_in, seed=config.run.seed,
                             folder=_path(config, "transformer_path", workdir)), param_dtype)
    tree = lora_tree(workdir, step, weights, model_config, config)
    full = lora.split_tree(tree)[1]
    if full:
        trained = nnx.state(module, lora.full_filter(section.train_also))
        nnx.replace_by_pure_dict(trained, jax.tree.map(
            lambda x, old: jnp.asarray(x, param_dtype, device=old.sharding), full,
            nnx.to_pure_dict(trained)))
        nnx.update(module, trained)
    lora.merge(module, tree, section.scale)
    return module


def transformer_module(workdir: str, step: int, weights: str, model_config,
                       runtime: Runtime = Runtime(), *,
                       config: TrainConfig | None = None) -> nnx.Module:
    """The run's transformer: its trained parameters of `step` (EMA or raw) in the
    runtime's `param_dtype` (default: as trained), its fixed buffers (the position table)
    recomputed from its config, placed by the runtime's shardings as they are read. A LoRA
    run's: its base with the trained factors merged in."""
    config = config or read_run_config(workdir)
    runtime = runtime.storing(config.compute.param_dtype)
    if config.lora.rank:
        return _lora_transformer(workdir, step, weights, model_config, runtime, config)
    shape = run_model("transformer", model_config, runtime, abstract=True)
    graphdef, params, buffers = nnx.split(shape, nnx.Param, ...)
    trained = trained_params(workdir, step, weights, nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, trained))
    placement = None if runtime.shardings is None else jax.tree.map(lambda x: x.sharding, buffers)
    return nnx.merge(graphdef, params, fixed_buffers(model_config, runtime.param_dtype, placement))


def scheduler_of(config: TrainConfig) -> dict:
    """The sampler settings of a run: its source pipeline's when it started from one, else
    SD3's (shift 3, 1000 training timesteps)."""
    pipeline = config.models.pipeline
    if pipeline:
        return read_scheduler(pipeline)
    return {"shift": flow.INFERENCE_SHIFT, "num_train_timesteps": flow.NUM_TRAIN_TIMESTEPS}


def run_trained_with(config: TrainConfig) -> TrainedWith:
    """What a run (its config.json) trained with, and so is sampled with: its prompt length,
    its resolution and the null prompt its instructions were dropped to."""
    return TrainedWith(text_length=config.data.max_length, resolution=config.data.resolution,
                       negative_prompt=NULL_PROMPT)


def trained_with(path: str) -> TrainedWith:
    """What the transformer of a training work dir or pipeline folder `path` was trained
    with, read without loading anything."""
    if is_training_run(path):
        return run_trained_with(read_run_config(path))
    return PipelineIndex.read(path).trained_with


def describe(workdir: str, step: int | None = None, weights: str | None = None) -> dict:
    """Which weights a run stands for — {'run', 'step', 'weights'} — without loading them."""
    read_run_config(workdir)
    step = resolve_step(workdir, step)
    return {"run": os.path.abspath(workdir), "step": step,
            "weights": resolve_weights(workdir, step, weights)}


def load_run_components(workdir: str, runtime: Runtime = Runtime(), *, vae_dtype=jnp.float32,
                        step: int | None = None,
                        weights: str | None = None) -> PipelineComponents:
    """`PipelineComponents` of a training work dir: the transformer of `step` (default: the
    latest) with its EMA weights (default when kept) or raw ones, and the run's frozen T5,
    VAE and tokenizer. Arguments as `checkpoints.pipeline_folder.load_components`."""
    config = read_run_config(workdir)
    chosen = describe(workdir, step, weights)
    tokenizer = run_tokenizer(workdir, config)
    vocab = len(tokenizer)
    tcfg = model_config(workdir, "transformer", vocab, config)
    transformer = transformer_module(workdir, chosen["step"], chosen["weights"], tcfg, runtime,
                                     config=config)
    t5 = frozen_module(workdir, "t5", model_config(workdir, "t5", vocab, config), runtime,
                       config=config)
    vae = frozen_module(workdir, "vae", model_config(workdir, "vae", vocab, config),
                        vae_runtime(runtime, vae_dtype), config=config)
    return PipelineComponents(
        transformer=transformer, t5=t5, vae=vae, tokenizer=tokenizer,
        scheduler=scheduler_of(config), mask_token_id=mask_token_id(tokenizer),
        path=os.path.abspath(workdir), trained_with=run_trained_with(config))

