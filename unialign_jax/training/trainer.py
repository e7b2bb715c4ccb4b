"""The training loop: resume or initialise, then step, log and checkpoint until done.

Every host runs this same function with the same config (multi-host: after
`jax.distributed.initialize`); each feeds its share of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from unialign_jax import files
from unialign_jax.checkpoints import training_steps
from unialign_jax.data.format.teacher_features import is_precomputed
from unialign_jax.data.read.grain_pipeline import (DataError, PipelineConfig, condition_images,
                                                   next_batch, training_iterator)
from unialign_jax.parallel import make_mesh, maybe_initialize_distributed, replicated
from unialign_jax.runs.config import TrainConfig
from unialign_jax.runs.builder import build_models, frozen_configs, transformer_config
from unialign_jax.runs.resolve import resolve
from unialign_jax.runs.work_dir import write_run_config
from unialign_jax.text.tokenizer import NULL_PROMPT, load_tokenizer, mask_token_id, tokenize
from unialign_jax.training.buckets import check_bucket_sizes
from unialign_jax.training.cached_latents import expected_latents, note_unused_caches
from unialign_jax.training.checkpointing import Checkpointer, PreemptionSignal
from unialign_jax.training.metrics import MetricWriter, NonFiniteGuard, NonFiniteLoss
from unialign_jax.training import evaluation, flops
from unialign_jax.training.step import FrozenModels, TrainStep, make_train_step

log = logging.getLogger(__name__)

# Metrics that depend on the wall clock (everything else a run logs is reproducible).
TIMING_METRICS = ("steps_per_s", "samples_per_s", "model_tflops_per_chip", "mfu",
                  *evaluation.TIMING_METRICS)


class HostFailure(RuntimeError):
    """Multi-host: a collective with the other processes failed (one of them died). The
    process must exit without jax.distributed's shutdown, which would wait for the dead
    one."""


class DiskFull(RuntimeError):
    """The work dir's disk filled up; the last committed checkpoint is intact."""


# Errors that end a run with their message (no traceback): nothing more to debug.
RUN_STOPS = (DataError, NonFiniteLoss, DiskFull, HostFailure)


@dataclasses.dataclass
class TrainResult:
    step: int                    # optimizer steps done when the run stopped
    preempted: bool              # stopped by a signal / a preemption notice, checkpointed
    stop_signal: int | None      # the signal that stopped it (None: ran out or a notice)
    last_metrics: dict
    state: object = None         # the final TrainState (for callers in the same process)
    trainer: TrainStep | None = None
    models: dict | None = None   # the SplitModels (graph definitions, frozen weights)


def corpora(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """{task: shard folders} of the trained tasks, in the mix's order."""
    return {task: folders for task, folders, _ in cfg.data.trained()}


def task_weights(cfg: TrainConfig) -> tuple[float, ...]:
    """`data.task_weights` of the tasks `corpora` trains on, in its order."""
    return tuple(weight for _, _, weight in cfg.data.trained())


def train(cfg: TrainConfig, workdir: str, *, echo=None,
          validation: evaluation.Validation | None = None) -> TrainResult:
    """Trains until `run.num_steps`, resuming from the latest checkpoint in `workdir`.

    `validation`: what samples `run.validation_prompts` at every eval
    (`unialign_jax.apps.validation.validation_of(cfg, workdir)`; `unialign-train` passes
    it: `training/` cannot import the samplers)."""
    maybe_initialize_distributed(cfg.mesh.distributed, cfg.mesh.heartbeat_timeout_s)
    cfg = resolve(cfg)
    cfg.validate()
    check_bucket_sizes(cfg)
    if bool(cfg.run.validation_prompts) != (validation is not None):
        raise ValueError("run.validation_prompts and the validation sampler go together: "
                         "pass validation=unialign_jax.apps.validation.validation_of(cfg, "
                         "workdir) to train() (unialign-train does)")
    main = jax.process_index() == 0
    echo = echo or (lambda s: tqdm.write(s) if main else None)
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    if main:
        write_run_config(workdir, cfg)
        if "://" not in workdir:
            files.remove_stale_partials(workdir, recursive=False)  # a killed run's config

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tokenizer = load_tokenizer(cfg.models.tokenizer)
    models = build_models(cfg.models, cfg.compute, mesh, len(tokenizer), seed=cfg.run.seed,
                          lora=cfg.lora)
    null_ids = jax.device_put(tokenize(tokenizer, [NULL_PROMPT], cfg.data.max_length),
                              replicated(mesh))
    frozen = FrozenModels.of(models, null_ids)
    trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer, loss=cfg.loss,
                              run=cfg.run, mask_id=mask_token_id(tokenizer))
    if cfg.run.batch_size % jax.process_count():
        raise ValueError(f"run.batch_size {cfg.run.batch_size} is not divisible by the "
                         f"{jax.process_count()} hosts")
    iterator = training_iterator(corpora(cfg), PipelineConfig(
        batch_size=cfg.run.batch_size // jax.process_count(), tokenizer=cfg.models.tokenizer,
        max_length=cfg.data.max_length, seed=cfg.data.seed, num_workers=cfg.data.workers,
        resolution=cfg.data.resolution, skip_corrupt=cfg.data.skip_corrupt,
        task_weights=task_weights(cfg), latents=expected_latents(cfg),
        buckets=cfg.data.buckets))
    note_unused_caches(cfg)
    if cfg.loss.align_weight and not all(is_precomputed(folder)
                                         for folders in corpora(cfg).values()
                                         for folder in folders):
        if not cfg.loss.allow_missing_teacher:
            raise ValueError("the training data has no teacher features, so the alignment "
                             "losses cannot be computed: precompute them "
                             "(unialign-data teacher), set loss.align_weight=0, or set "
                             "loss.allow_missing_teacher=True to train without them")
        log.warning("the data has no teacher features: alignment losses are off")

    ckpt = Checkpointer(str(root), every=cfg.run.ckpt_every, keep=cfg.run.keep_checkpoints,
                        use_async=cfg.run.async_checkpoints)
    state, resumed = ckpt.restore_latest(trainer.abstract_state, iterator,
                                         mode=cfg.run.resume)
    if resumed is None:
        state = trainer.init()
    else:
        echo(f"resuming from step {resumed} ({ckpt.directory})")
    start = int(jax.device_get(state.step))
    writer = MetricWriter(str(root), resume_step=start, tensorboard=cfg.run.tensorboard,
                          enabled=main, echo=echo)
    echo(f"mesh {dict(mesh.shape)}; {trainer.num_micro} micro-batches of "
         f"{cfg.run.batch_size // trainer.num_micro} per step; "
         f"{_count(models['transformer'].params) / 1e6:.2f}M trained parameters"
         + (f" (LoRA rank {cfg.lora.rank}, frozen base: {cfg.lora.base or 'random init'})"
            if cfg.lora.rank else ""))

    evaluator = evaluation.evaluator(cfg, trainer, models, mask_token_id(tokenizer))
    throughput = Throughput.of_run(cfg, len(tokenizer))
    last, preempted, stop_signal, step = {}, False, None, start
    guard, skipped_records = NonFiniteGuard(cfg.run.max_nonfinite_steps), 0
    bar = tqdm(total=cfg.run.num_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (cfg.run.progress_bar and main))
    tick, tick_step = time.perf_counter(), start
    peer_failed = False
    try:
        with PreemptionSignal() as preemption:
            while step < cfg.run.num_steps:
                host_batch = next_batch(iterator, cfg.data.worker_timeout_s)
                skipped_records += int(np.sum(host_batch.get("skipped", 0)))
                state, metrics = trainer.step(state, frozen, trainer.put_batch(host_batch))
                step += 1
                guard.push(step, metrics["nonfinite"], _batch_names(host_batch))
                guard.settle(before=step)  # the previous step's flag: no wait for this one
                bar.update(1)
                evaluated = {}
                if cfg.run.eval_every and (step % cfg.run.eval_every == 0
                                           or step == cfg.run.num_steps):
                    evaluated = evaluation.evaluate(step, state, frozen, evaluator, validation,
                                                    models, mesh, writer)
                    tick += sum(v for k, v in evaluated.items()  # steps_per_s: training only
                                if k in evaluation.TIMING_METRICS)
                    if step % cfg.run.log_every and step != cfg.run.num_steps:
                        writer.write(step, evaluated)
                if step % cfg.run.log_every == 0 or step == cfg.run.num_steps:
                    guard.settle()
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()
                            if k != "nonfinite"}
                    last["nonfinite_steps"] = guard.take_window()
                    if cfg.data.skip_corrupt:
                        last["data_skipped"], skipped_records = skipped_records, 0
                    elapsed = time.perf_counter() - tick
                    last["steps_per_s"] = (step - tick_step) / elapsed
                    last["samples_per_s"] = last["steps_per_s"] * cfg.run.batch_size
                    last.update(throughput.of(last["samples_per_s"]), **evaluated)
                    tick, tick_step = time.perf_counter(), step
                    writer.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                stop = preemption.requested or (jax.process_count() > 1
                                                and ckpt.reached_preemption(step))
                ckpt.save(step, state, iterator, force=stop or step == cfg.run.num_steps)
                if stop:
                    stop_signal = preemption.signum
                    reason = "interrupted" if stop_signal == signal.SIGINT else "preempted"
                    echo(f"{reason} at step {step}: checkpoint saved; rerun to resume")
                    preempted = True
                    break
            guard.settle()
        ckpt.finish()
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        peer_failed = True
        raise HostFailure(
            f"process {jax.process_index()} of {jax.process_count()}: a collective with the "
            f"other processes failed at step {step + 1} ({str(e).splitlines()[0]}); another "
            "process has probably died. Restart all of them to resume from the last "
            "checkpoint") from e
    except Exception as e:
        if not files.is_disk_full(e):
            raise
        with contextlib.suppress(Exception):  # the failed save reports the same error
            ckpt.finish()
        ckpt.discard_unfinished()
        raise DiskFull(files.disk_full_message(str(root)) + f" (the newest checkpoint, step "
                       f"{training_steps.latest_valid_step(str(root))}, is intact)") from e
    finally:
        bar.close()
        if not peer_failed:
            ckpt.finish()
        writer.close()
        if hasattr(iterator, "close") and not peer_failed:
            iterator.close()
    return TrainResult(step=step, preempted=preempted, stop_signal=stop_signal,
                       last_metrics=last, state=state,
                       trainer=trainer, models=models)


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Model FLOP/s per chip and MFU from samples/s: the figures `scripts/bench_train.py`
    reports, logged by every run (FLOPs of `training.flops`, recomputation not counted)."""

    flops_per_sample: float          # mean over the mixed tasks, by their weights
    chips: int
    device_kind: str

    @classmethod
    def of_run(cls, cfg: TrainConfig, vocab_size: int) -> "Throughput":
        t5, vae = frozen_configs(cfg.models)
        transformer = transformer_config(cfg.models, vocab_size)
        per_task = [flops.sample_flops(transformer, t5, vae, flops.StepShape(
            cfg.data.resolution, cfg.data.max_length, condition_images(task, folders),
            encodes_images=not cfg.data.cached_latents))["total"]
            for task, folders in corpora(cfg).items()]
        mean = float(np.average(per_task, weights=task_weights(cfg))) if per_task else 0.0
        return cls(mean, jax.device_count(),
                   jax.devices()[0].device_kind)

    def of(self, samples_per_s: float) -> dict[str, float]:
        out = {"model_tflops_per_chip": samples_per_s * self.flops_per_sample / self.chips / 1e12}
        utilisation = flops.mfu(samples_per_s, self.flops_per_sample, self.chips,
                                self.device_kind)
        if utilisation is not None:
            out["mfu"] = utilisation
        return out


def _batch_names(batch: dict) -> dict:
    """What to name if this batch stops the run: its task and record indices."""
    return {"task": int(batch["task"][0]), "records": [int(i) for i in batch["index"]]}


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
