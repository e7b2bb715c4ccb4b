"""Evaluation while training (`run.eval_every`): a held-out loss that only the weights
decide, and the hook that samples the validation prompts.

The eval loss is the training objective (`objective.objective`) on the held-out shards of
`data.eval_tasks`, with nothing left to chance or to the mesh, so that its curve moves only
when the weights do — the same numbers after a restart and on any mesh (MaxDiffusion's
MLPerf-style eval at fixed timesteps does the same for its image loss):

- the batches: the first `run.eval_batches` batches of each task's shards, in record order
  (never shuffled; read afresh at every eval, so the eval needs no checkpointed iterator),
  of `run.eval_batch_size` rows for the whole run (hosts read their share as in training);
- the image timesteps: a fixed grid of `EVAL_TIMESTEPS` (timestep_grid: 62, 187, ..., 937
  of 1000), row i at grid[i mod 8], instead of logit-normal draws; caption times at the
  centres of their strata; no null-prompt dropout (the conditional prediction is measured);
- the noise — VAE posterior samples, image noise, caption masks — from a fixed key per
  (task, batch), the same in every eval and every run;
- the terms that couple rows (the contrastive loss, the antithetic caption times) over
  the whole eval batch (the "global" scopes), never per device.

The eval runs on the EMA parameters when the run keeps them (the weights it would release
and the samplers use by default), else the raw ones; each term of the mean over all eval
batches is logged as `eval/<term>` (and, with several eval tasks, `eval/<task>/<term>`).

Validation sampling needs the samplers, which sit beside this package on the same floor
(`unialign_jax.sampling` may not be imported here; tests/test_layering.py): the trainer
takes it as a hook, `validation(step, params, models, mesh, writer)`, built on the top floor
by `unialign_jax.apps.validation` (which `unialign-train` and the quickstart wire in).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unialign_jax.data.format.records import KINDS as TASKS
from unialign_jax.data.read.grain_pipeline import TASK_IDS, PipelineConfig, task_batches
from unialign_jax.diffusion import flow
from unialign_jax.parallel import batch_ways, replicated
from unialign_jax.training import objective
from unialign_jax.runs.config import LossConfig, TrainConfig
from unialign_jax.training.cached_latents import expected_latents
from unialign_jax.training.metrics import MetricWriter
from unialign_jax.runs.builder import SplitModel
from unialign_jax.training.step import FrozenModels, TrainStep

EVAL_TIMESTEPS = 8      # image timesteps of the grid; every batch of ≥ 8 rows sees them all
EVAL_SEED = 0           # the key of every eval draw, whatever the run's seed
PREFIX = "eval/"
# Logged eval metrics that depend on the wall clock (the trainer's TIMING_METRICS).
TIMING_METRICS = (PREFIX + "seconds", "validation/seconds")


class Validation(Protocol):
    """Samples the validation prompts with `params` (the transformer's trained parameters
    as `models['transformer'].module(params)` takes them) and writes them: PNGs under
    WORKDIR/validation/STEP/ from the main process only, images to `writer`. Every process
    calls it (the samplers run on the whole mesh)."""

    def __call__(self, step: int, params: dict, models: dict[str, SplitModel], mesh: Mesh,
                 writer: MetricWriter) -> None: ...


def timestep_grid(count: int = EVAL_TIMESTEPS,
                  num_train_timesteps: int = flow.NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """`count` integer timesteps at the centres of equal parts of (0, T]."""
    k = np.arange(count)
    return (num_train_timesteps * (2 * k + 1)) // (2 * count)


def eval_draws(key: jax.Array, latent_shape: tuple[int, ...], length: int,
               num_train_timesteps: int = flow.NUM_TRAIN_TIMESTEPS) -> objective.Draws:
    """The draws of one eval batch (for a loss config with logit mean 0 and std 1): row i
    at timestep grid[i mod EVAL_TIMESTEPS] exactly, no null prompt, caption times at the
    centres of their strata; the noise and the caption masks from `key`."""
    b = latent_shape[0]
    timesteps = jnp.asarray(np.resize(timestep_grid(num_train_timesteps=num_train_timesteps),
                                      b), jnp.float32)
    # flow.training_timesteps takes index ⌊T·sigmoid(u)⌋ and timestep T − index: the centre
    # of the index's interval gives the timestep whatever the rounding of sigmoid(logit(·)).
    normal = jax.scipy.special.logit((num_train_timesteps - timesteps + 0.5)
                                     / num_train_timesteps)
    k_noise, k_mask = jax.random.split(key)
    return objective.Draws(
        flow_logit_normal=normal,
        flow_noise=jax.random.normal(k_noise, latent_shape, jnp.float32),
        null_prompt_uniform=jnp.ones((b,), jnp.float32),   # never below null_prompt_prob ≤ 1
        caption_time_uniform=jnp.full((b,), 0.5, jnp.float32),
        caption_mask_uniform=jax.random.uniform(k_mask, (b, length)))


def make_eval_step(models: dict[str, SplitModel], loss: LossConfig, mask_id: int,
                   mesh: Mesh) -> Callable:
    """`step(params, frozen, batch, task_id, index)` → {term: replicated scalar}: the
    objective of one eval batch with the draws of (task, index), jitted (one compile per
    task's batch shape)."""
    graphdefs = {k: m.graphdef for k, m in models.items()}
    cfg = dataclasses.replace(loss, logit_mean=0.0, logit_std=1.0)  # eval_draws' timesteps

    def step(params, frozen: FrozenModels, batch: dict, task_id, index):
        transformer = nnx.merge(graphdefs["transformer"], params, frozen.buffers)
        t5 = nnx.merge(graphdefs["t5"], frozen.t5)
        vae = nnx.merge(graphdefs["vae"], frozen.vae)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(EVAL_SEED), task_id), index)
        k_vae, k_draws = jax.random.split(key)
        inputs = objective.batch_inputs(vae, batch, k_vae)
        draws = eval_draws(k_draws, inputs.latents.shape, batch["caption_ids"].shape[1])
        _, terms = objective.objective(transformer, t5, inputs, draws, t5(frozen.null_ids), cfg,
                                       mask_id, objective.Groups())
        return {k: v for k, v in terms.items() if k.startswith("loss")}

    return jax.jit(step, out_shardings=replicated(mesh))


@dataclasses.dataclass
class Evaluator:
    """The eval loss of a run: `evaluator(params, frozen)` → {'eval/<term>': mean}."""

    batches: dict[str, grain.MapDataset]   # per task: this host's rows of its eval batches
    step: Callable
    put_batch: Callable[[dict], dict]
    read_threads: int = 2

    def __call__(self, params, frozen: FrozenModels) -> dict[str, float]:
        per_task = {}
        for task, batches in self.batches.items():
            reads = batches.to_iter_dataset(grain.ReadOptions(
                num_threads=self.read_threads, prefetch_buffer_size=self.read_threads))
            per_task[task] = [self.step(params, frozen, self.put_batch(host_batch),
                                        TASK_IDS[task], index)
                              for index, host_batch in enumerate(reads)]
        per_task = jax.device_get(per_task)
        every = [terms for batches in per_task.values() for terms in batches]
        out = {PREFIX + k: _mean(every, k) for k in every[0]}
        if len(per_task) > 1:
            out.update({f"{PREFIX}{task}/{k}": _mean(batches, k)
                        for task, batches in per_task.items() for k in batches[0]})
        return out


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([np.float64(r[key]) for r in rows]))


def evaluator(cfg: TrainConfig, trainer: TrainStep, models: dict[str, SplitModel],
              mask_id: int) -> Evaluator | None:
    """The `Evaluator` of `data.eval_tasks` (None without any); errors for an eval batch
    that the mesh or the hosts cannot split, or shards smaller than one batch."""
    if not cfg.data.eval_tasks:
        return None
    size, hosts = cfg.run.eval_batch_size or cfg.run.batch_size, jax.process_count()
    ways = batch_ways(trainer.mesh)
    if size % hosts or size % ways:
        raise ValueError(f"the eval batch of {size} rows (run.eval_batch_size, default "
                         f"run.batch_size) does not split over {hosts} hosts and {ways} "
                         "batch devices")
    read = PipelineConfig(batch_size=size // hosts, tokenizer=cfg.models.tokenizer,
                          max_length=cfg.data.max_length, shuffle=False, num_epochs=1,
                          process_index=0, process_count=1, resolution=cfg.data.resolution,
                          skip_corrupt=cfg.data.skip_corrupt, latents=expected_latents(cfg),
                          buckets=cfg.data.buckets)
    batches = {}
    for task in TASKS:
        folders = cfg.data.eval_tasks.get(task)
        if not folders:
            continue
        # Host-size pieces in record order; global batch k is pieces kP ... kP + P − 1.
        pieces = task_batches(task, folders, read, seed=0)
        count = min(cfg.run.eval_batches, len(pieces) // hosts)
        if not count:
            raise ValueError(f"data.eval_tasks[{task!r}] {list(folders)} holds fewer records "
                             f"than one eval batch of {size} (run.eval_batch_size)")
        batches[task] = pieces[jax.process_index():count * hosts:hosts]
    return Evaluator(batches, make_eval_step(models, cfg.loss, mask_id, trainer.mesh),
                     trainer.put_batch)


def evaluate(step: int, state, frozen: FrozenModels, evaluator: Evaluator | None,
             validation: Validation | None, models: dict[str, SplitModel], mesh: Mesh,
             writer: MetricWriter) -> dict[str, float]:
    """One eval at `step`: the eval loss and the validation samples of the EMA parameters
    (the raw ones without EMA), with the seconds each took."""
    params = state.params if state.ema_params is None else state.ema_params
    jax.block_until_ready(params)  # the step before is not the eval's time
    out = {}
    if evaluator is not None:
        start = time.perf_counter()
        out.update(evaluator(params, frozen))
        out[PREFIX + "seconds"] = time.perf_counter() - start
    if validation is not None:
        start = time.perf_counter()
        validation(step, params, models, mesh, writer)
        out["validation/seconds"] = time.perf_counter() - start
    return out
