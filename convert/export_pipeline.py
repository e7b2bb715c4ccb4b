"""`unialign-convert export-pipeline`: a pipeline folder → the release's diffusers layout.

transformer/ (SD3JointModelFlexible), text_encoder/ (T5EncoderModel), vae/ (AutoencoderKL),
tokenizer/ (copied as is, pad token included), scheduler/ (FlowMatchEulerDiscreteScheduler
with the folder's shift) and model_index.json naming the release's UniAlignmentPipeline.
`unialign-convert pipeline` reads the result back into an equal pipeline folder. The T5
keeps the mask token's row as the folder has it (the release ships that row separately, as
`mask_token_emb`; here it is inside `shared.weight`). Components are exported one after
another, so host memory holds one component at a time.
"""

from __future__ import annotations

import os
import shutil
import sys

from unialign_convert.export import DEFAULT_MAX_SHARD_SIZE, read_folder, write_export
from unialign_convert.diffusers_pipeline import LAYOUTS, SCHEDULER_CLASS
from unialign_convert.safetensors_io import ConversionError, parse_size
from unialign_jax import files
from unialign_jax.runs import work_dir
from unialign_jax.checkpoints.pipeline_folder import PipelineIndex, read_scheduler

LAYOUT = LAYOUTS["unialignment"]
# Which module kind each pipeline component is, and the class names the release's
# `UniAlignmentPipeline.from_pretrained` reads from model_index.json.
_KINDS = {"transformer": "transformer", "text_encoder": "t5", "vae": "vae"}
MODEL_INDEX = {
    "_class_name": "UniAlignmentPipeline",
    "transformer": ["modules.unialignment_model", "SD3JointModelFlexible"],
    "scheduler": ["diffusers", SCHEDULER_CLASS],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
}


def write_pipeline_export(src: str, out_dir: str, *, dtype: str = "float32",
                          vae_dtype: str = "float32",
                          max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Exports the pipeline folder `src` into the existing folder `out_dir`; returns a
    summary per component."""
    if work_dir.is_training_run(src):
        raise ConversionError(f"{src} is a training work dir: make it a pipeline folder first "
                              "with `unialign-convert from-run WORKDIR DIR`")
    index = PipelineIndex.read(src)
    where = index.paths(src)
    parse_size(max_shard_size)
    summary = {}
    for number, (component, kind) in enumerate(_KINDS.items(), 1):
        print(f"[{number}/3] {component}", file=sys.stderr)
        config, tree = read_folder(kind, where[component])
        if kind == "transformer" and config.is_sd3:
            raise ConversionError(f"{where[component]}: an SD3-layout transformer; a "
                                  "UniAlignment pipeline needs the UniAlignment layout")
        folder = os.path.join(out_dir, LAYOUT[component])
        os.makedirs(folder)
        summary[component] = write_export(kind, config, tree, folder,
                                          dtype=vae_dtype if kind == "vae" else dtype,
                                          max_shard_size=max_shard_size)
        del tree
    shutil.copytree(where["tokenizer"], os.path.join(out_dir, LAYOUT["tokenizer"]))
    scheduler = read_scheduler(src, index)
    files.write_json(os.path.join(out_dir, LAYOUT["scheduler"], "scheduler_config.json"),
                     {"_class_name": SCHEDULER_CLASS, "shift": scheduler["shift"],
                      "num_train_timesteps": scheduler["num_train_timesteps"]})
    files.write_json(os.path.join(out_dir, "model_index.json"), MODEL_INDEX)
    return summary


export_pipeline = files.into_new_folder(write_pipeline_export)


def run(args) -> None:
    summary = export_pipeline(args.src, args.dst, dtype=args.dtype, vae_dtype=args.vae_dtype,
                              max_shard_size=args.max_shard_size, force=args.force)
    tensors = sum(part["num_tensors"] for part in summary.values())
    print(f"exported the pipeline ({tensors} tensors) into {args.dst} in the release's "
          "layout (transformer/, text_encoder/, vae/, tokenizer/, scheduler/)")
