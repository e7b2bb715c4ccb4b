"""A run's config resolved against the folders it names: what the trainer runs and records.

The schema (`runs.config`) stays pure data; this is the one place where a config meets
the file system before training: a LoRA base and a pipeline folder become component
paths, and the cosine's end becomes a step.
"""

from __future__ import annotations

import dataclasses
import os

from unialign_jax.checkpoints.pipeline_folder import INDEX_FILE, component_paths
from unialign_jax.runs.config import TrainConfig
from unialign_jax.runs.work_dir import is_training_run


def resolve(cfg: TrainConfig) -> TrainConfig:
    """A copy with the LoRA base and the pipeline folder expanded into component paths
    (a LoRA run then records the transformer it adapts as lora.base) and the cosine's
    end at the run's last step when asked for. Resolving twice changes nothing."""
    cfg = _with_lora_base(cfg) if cfg.lora.base else cfg
    if cfg.models.pipeline is not None:
        where, m = component_paths(cfg.models.pipeline), cfg.models
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(
            m, transformer_path=m.transformer_path or where["transformer"],
            t5_path=m.t5_path or where["text_encoder"], vae_path=m.vae_path or where["vae"],
            tokenizer=m.tokenizer or where["tokenizer"]))
    if cfg.lora.rank and cfg.lora.base is None:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(
            cfg.lora, base=cfg.models.transformer_path))
    if cfg.optimizer.cosine_end_step == -1:
        end = cfg.run.num_steps if cfg.run.num_steps > cfg.optimizer.warmup_steps else 0
        cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(
            cfg.optimizer, cosine_end_step=end))
    return cfg


def _with_lora_base(cfg: TrainConfig) -> TrainConfig:
    """lora.base in `models`: a pipeline folder as models.pipeline, a transformer folder
    as models.transformer_path; another transformer named there is an error."""
    base, m = os.path.abspath(cfg.lora.base), cfg.models
    if is_training_run(base):
        raise ValueError(f"lora.base {cfg.lora.base} is a training work dir: make it a "
                         "pipeline folder first (unialign-convert from-run WORKDIR DST)")
    is_pipeline = os.path.isfile(os.path.join(base, INDEX_FILE))
    transformer = component_paths(base)["transformer"] if is_pipeline else base
    if m.transformer_path and os.path.abspath(m.transformer_path) != transformer:
        raise ValueError(f"lora.base ({cfg.lora.base}) and models.transformer_path "
                         f"({m.transformer_path}) name different transformers")
    models = dataclasses.replace(m, transformer_path=transformer,
                                 pipeline=base if is_pipeline else m.pipeline)
    return dataclasses.replace(cfg, models=models,
                               lora=dataclasses.replace(cfg.lora, base=base))
