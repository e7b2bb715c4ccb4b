"""The training loop: resume or initialise, then step, log and checkpoint until done.

Every host runs this same function with the same config (multi-host: after
`jax.distributed.initialize`); each feeds its share of the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from unialign_jax import files
from unialign_jax.data.pipeline import PipelineConfig, training_iterator
from unialign_jax.data.teacher import has_teacher
from unialign_jax.parallel import make_mesh, maybe_initialize_distributed, replicated
from unialign_jax.text.tokenizer import load_tokenizer, mask_token_id, tokenize
from unialign_jax.training.checkpointing import Checkpointer, PreemptionSignal
from unialign_jax.training.config import TrainConfig
from unialign_jax.training.metrics import MetricWriter
from unialign_jax.training.models import build_models
from unialign_jax.training.step import FrozenModels, TrainStep, make_train_step

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
NULL_PROMPT = " "


@dataclasses.dataclass
class TrainResult:
    step: int                    # optimizer steps done when the run stopped
    preempted: bool              # stopped by SIGTERM / a preemption notice, checkpointed
    last_metrics: dict
    state: object = None         # the final TrainState (for callers in the same process)
    trainer: TrainStep | None = None
    models: dict | None = None   # the SplitModels (graph definitions, frozen weights)


def corpora(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """{task: shard folders} in alternation order: text-to-image first, then editing."""
    return {task: folders for task, folders in (("t2i", cfg.data.t2i_shards),
                                                ("edit", cfg.data.edit_shards)) if folders}


def train(cfg: TrainConfig, workdir: str, *, echo=None) -> TrainResult:
    """Trains until `run.num_steps`, resuming from the latest checkpoint in `workdir`."""
    maybe_initialize_distributed(cfg.mesh.distributed)
    cfg = cfg.resolved()
    cfg.validate()
    main = jax.process_index() == 0
    echo = echo or (lambda s: tqdm.write(s) if main else None)
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    if main:
        files.write_json(root / CONFIG_FILE, cfg.to_dict())

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tokenizer = load_tokenizer(cfg.models.tokenizer)
    models = build_models(cfg.models, cfg.compute, mesh, len(tokenizer), seed=cfg.run.seed)
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
        resolution=cfg.data.resolution))
    if cfg.loss.align_weight and not all(has_teacher(folder) for folders in corpora(cfg).values()
                                         for folder in folders):
        if not cfg.loss.allow_missing_teacher:
            raise ValueError("the training data has no teacher features, so the alignment "
                             "losses cannot be computed: precompute them "
                             "(unialign-data teacher), set loss.align_weight=0, or set "
                             "loss.allow_missing_teacher=True to train without them")
        log.warning("the data has no teacher features: alignment losses are off")

    ckpt = Checkpointer(str(root), every=cfg.run.ckpt_every, keep=cfg.run.keep_checkpoints,
                        use_async=cfg.run.async_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        echo(f"resuming from step {latest} ({ckpt.directory})")
        state = ckpt.restore(latest, trainer.abstract_state, iterator)
    else:
        state = trainer.init()
    start = int(jax.device_get(state.step))
    writer = MetricWriter(str(root), resume_step=start, tensorboard=cfg.run.tensorboard,
                          enabled=main, echo=echo)
    echo(f"mesh {dict(mesh.shape)}; {trainer.num_micro} micro-batches of "
         f"{cfg.run.batch_size // trainer.num_micro} per step; "
         f"{_count(models['transformer'].params) / 1e6:.2f}M trained parameters")

    last, preempted, step = {}, False, start
    bar = tqdm(total=cfg.run.num_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (cfg.run.progress_bar and main))
    tick, tick_step = time.perf_counter(), start
    try:
        with PreemptionSignal() as preemption:
            while step < cfg.run.num_steps:
                host_batch = next(iterator)
                state, metrics = trainer.step(state, frozen, trainer.put_batch(host_batch))
                step += 1
                bar.update(1)
                if step % cfg.run.log_every == 0 or step == cfg.run.num_steps:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - tick
                    last["steps_per_s"] = (step - tick_step) / elapsed
                    last["samples_per_s"] = last["steps_per_s"] * cfg.run.batch_size
                    tick, tick_step = time.perf_counter(), step
                    writer.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                stop = preemption.requested or (jax.process_count() > 1
                                                and ckpt.reached_preemption(step))
                ckpt.save(step, state, iterator, force=stop or step == cfg.run.num_steps)
                if stop:
                    echo(f"preempted at step {step}: checkpoint saved; rerun to resume")
                    preempted = True
                    break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
        if hasattr(iterator, "close"):
            iterator.close()
    return TrainResult(step=step, preempted=preempted, last_metrics=last, state=state,
                       trainer=trainer, models=models)


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
