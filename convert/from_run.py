"""`unialign-convert from-run`: a training work dir → a pipeline folder `load_pipeline` opens.

The trained transformer of one checkpoint step (EMA weights by default when the run keeps
them, else raw) and the run's frozen T5, VAE and tokenizer, read by
`unialign_jax.runs.work_dir` — the same reader `load_pipeline(WORKDIR)` uses, so
the folder holds exactly what loading the work dir gives. Frozen models the run read from
converted folders are copied as stored; random ones (the quickstart, tests) are redrawn
from the run's seed and written out. The tokenizer is saved padding with `</s>`, as the run
trained (inference pads with the folder's pad token).
"""

from __future__ import annotations

import os
import shutil
import sys

from unialign_jax import files
from unialign_jax.checkpoints import registry
from unialign_jax.checkpoints.pipeline_folder import COMPONENT_DIRS, PipelineIndex, write_scheduler
from unialign_jax.models.runtime import Runtime
from unialign_jax.parallel import make_mesh, module_shardings
from unialign_jax.runs import work_dir
from unialign_jax.text.tokenizer import mask_token_id

LAYOUT = "training_run"
_FROZEN_DIRS = {"t5": "text_encoder", "vae": "vae"}


def write_run_pipeline(workdir: str, out_dir: str, *, step: int | None = None,
                       weights: str | None = None) -> PipelineIndex:
    """Writes the pipeline of `workdir` into the existing folder `out_dir`; returns its index."""
    config = work_dir.read_run_config(workdir)
    chosen = work_dir.describe(workdir, step, weights)
    tokenizer = work_dir.run_tokenizer(workdir, config)
    out = {k: os.path.join(out_dir, v) for k, v in COMPONENT_DIRS.items()}
    tokenizer.save_pretrained(out["tokenizer"])

    print(f"[1/3] transformer (step {chosen['step']}, {chosen['weights']} weights)",
          file=sys.stderr)
    param_dtype = config.compute.param_dtype
    tcfg = work_dir.model_config(workdir, "transformer", len(tokenizer), config)
    # Placed as load_pipeline places them: the same compiled initialisations serve both.
    runtime = Runtime(shardings=module_shardings(make_mesh()))
    transformer = work_dir.transformer_module(workdir, chosen["step"], chosen["weights"],
                                              tcfg, runtime, config=config)
    registry.save_model("transformer", transformer, out["transformer"], param_dtype)
    del transformer
    frozen = {}
    for number, (kind, name) in enumerate(_FROZEN_DIRS.items(), 2):
        source = frozen[kind] = work_dir.frozen_source(config, kind)
        how = (f"copied from {source['folder']}" if "folder" in source
               else f"random initialisation redrawn (seed {source['seed']})")
        print(f"[{number}/3] {kind}: {how}", file=sys.stderr)
        if "folder" in source:
            shutil.copytree(source["folder"], out[name])
            continue
        module = work_dir.frozen_module(
            workdir, kind, work_dir.model_config(workdir, kind, len(tokenizer), config), runtime,
            config=config)
        registry.save_model(kind, module, out[name], source["param_dtype"])

    write_scheduler(out_dir, work_dir.scheduler_of(config))
    index = PipelineIndex(
        source=os.path.abspath(workdir), layout=LAYOUT, training_run=chosen, frozen=frozen,
        vocab_size=len(tokenizer), trained_with=work_dir.run_trained_with(config),
        mask_token_id=mask_token_id(tokenizer), dtype=param_dtype,
        vae_dtype=registry.read_config(out["vae"], "vae")[1])
    index.write(out_dir)
    return index


convert_run = files.into_new_folder(write_run_pipeline)


def run(args) -> None:
    index = convert_run(args.src, args.dst, step=args.step, weights=args.weights,
                        force=args.force)
    chosen = index.training_run
    print(f"wrote the pipeline of {args.src} (step {chosen['step']}, {chosen['weights']} "
          f"weights) into {args.dst} (load it with unialign_jax.load_pipeline)")
