"""The training loop: resume or initialise, then step, log and checkpoint until done.

Every host runs this same function with the same config (multi-host: after
`jax.distributed.initialize`); each feeds its share of the global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from unialign_jax.data.pipeline import PipelineConfig, training_iterator
from unialign_jax.parallel import make_mesh, maybe_initialize_distributed
from unialign_jax.text.tokenizer import load_tokenizer, mask_token_id, tokenize
from unialign_jax.training.checkpointing import Checkpointer, PreemptionSignal
from unialign_jax.training.config import TrainConfig
from unialign_jax.training.metrics import MetricWriter
from unialign_jax.training.models import build_models
from unialign_jax.training.objective import TEACHER_KEYS
from unialign_jax.training.step import TrainStep

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


def corpora(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """{task: shard folders} in alternation order: text-to-image first, then editing."""
    return {task: folders for task, folders in (("t2i", cfg.t2i_shards),
                                                ("edit", cfg.edit_shards)) if folders}


def _write_config(workdir: epath.Path, cfg: TrainConfig) -> None:
    path = workdir / CONFIG_FILE
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def train(cfg: TrainConfig, workdir: str, *, echo=None) -> TrainResult:
    """Trains until `cfg.num_steps`, resuming from the latest checkpoint in `workdir`."""
    maybe_initialize_distributed(cfg.distributed)
    cfg = cfg.resolved()
    cfg.validate()
    main = jax.process_index() == 0
    echo = echo or (lambda s: tqdm.write(s) if main else None)
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    if main:
        _write_config(root, cfg)

    mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    tokenizer = load_tokenizer(cfg.tokenizer)
    null_ids = tokenize(tokenizer, [NULL_PROMPT], cfg.max_length)
    models = build_models(cfg, mesh, len(tokenizer))
    trainer = TrainStep(models, cfg, mesh, mask_id=mask_token_id(tokenizer), null_ids=null_ids)
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the "
                         f"{jax.process_count()} hosts")
    iterator = training_iterator(corpora(cfg), PipelineConfig(
        batch_size=cfg.batch_size // jax.process_count(), tokenizer=cfg.tokenizer,
        max_length=cfg.max_length, seed=cfg.data_seed, num_workers=cfg.data_workers,
        resolution=cfg.resolution))

    ckpt = Checkpointer(str(root), every=cfg.ckpt_every, keep=cfg.keep_checkpoints,
                        use_async=cfg.async_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        echo(f"resuming from step {latest} ({ckpt.directory})")
        state = ckpt.restore(latest, trainer.abstract_state, iterator)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))
    writer = MetricWriter(str(root), resume_step=start, tensorboard=cfg.tensorboard,
                          enabled=main, echo=echo)
    echo(f"mesh {dict(mesh.shape)}; {trainer.num_micro} micro-batches of "
         f"{cfg.batch_size // trainer.num_micro} per step; "
         f"{_count(models['transformer'].params) / 1e6:.2f}M trained parameters")

    last, preempted, step = {}, False, start
    bar = tqdm(total=cfg.num_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress_bar and main))
    warned_teacher = False
    tick, tick_step = time.perf_counter(), start
    try:
        with PreemptionSignal() as preemption:
            while step < cfg.num_steps:
                host_batch = next(iterator)
                if not warned_teacher and cfg.align_weight and not all(
                        k in host_batch for k in TEACHER_KEYS):
                    log.warning("the data has no teacher features: alignment losses are off "
                                "(compute them with scripts/precompute_teacher.py)")
                    warned_teacher = True
                state, metrics = trainer.step(state, trainer.frozen, trainer.put_batch(host_batch))
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - tick
                    last["steps_per_s"] = (step - tick_step) / elapsed
                    last["samples_per_s"] = last["steps_per_s"] * cfg.batch_size
                    tick, tick_step = time.perf_counter(), step
                    writer.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                stop = preemption.requested or (jax.process_count() > 1
                                                and ckpt.reached_preemption(step))
                ckpt.save(step, state, iterator, force=stop or step == cfg.num_steps)
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
                       trainer=trainer)


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
