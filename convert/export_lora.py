"""`unialign-convert export-lora`: a LoRA run's factors → one safetensors file in the
diffusers / PEFT naming (`unialign_jax.checkpoints.lora_files`), which PyTorch loads with
peft into the base's export (`unialign_convert.torch_unialignment.SD3JointModelFlexible`,
`load_lora_adapter(DST, prefix="transformer")`) and we load with
`UniAlignPipeline.load_lora(DST)` or `unialign-sample --lora DST`. The run's alpha / rank is
folded into lora_B (see `lora_files` for why), so every loader applies the same update.

The factors of one checkpoint step (EMA by default when the run keeps one) are read alone:
the base is not needed. Tensors a run trained in full (`lora.train_also`) have no place in
a LoRA file, so such runs are refused with the way out (`unialign-convert export` writes
the merged transformer). Beside DST the command line leaves DST.produced_by.json
(`reruns.record_path`): what made the file, so that a rerun finds it done; no loader reads it.
"""

from __future__ import annotations

import os

from unialign_convert.param_mapping import output_dtype
from unialign_convert.safetensors_io import ConversionError
from unialign_jax.checkpoints import lora_files
from unialign_jax.runs import work_dir


def export_lora(src: str, dst: str, *, dtype: str = "float32", step: int | None = None,
                weights: str | None = None, force: bool = False) -> dict:
    """Writes the LoRA of the training work dir `src` to the file `dst`; returns a summary."""
    if os.path.isdir(dst) or (os.path.exists(dst) and not force):
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it"
                              if not os.path.isdir(dst) else f"{dst} is a folder, not a file")
    config = work_dir.read_run_config(src)
    section = config.lora
    if not section.rank:
        raise ConversionError(f"{src} is not a LoRA run (lora.rank is 0): export its "
                              "transformer with `unialign-convert export`")
    if section.train_also:
        raise ConversionError(
            f"{src} also trained full tensors (lora.train_also = {list(section.train_also)}), "
            "which a LoRA file cannot hold: export the merged transformer with "
            "`unialign-convert export` instead")
    chosen = work_dir.describe(src, step, weights)
    vocab = len(work_dir.run_tokenizer(src, config))
    model_config = work_dir.model_config(src, "transformer", vocab, config)
    tree = work_dir.lora_tree(src, chosen["step"], chosen["weights"], model_config, config)
    scale = section.scale
    about = {"training_run": chosen, "rank": section.rank, "alpha": section.alpha,
             "targets": list(section.targets), "scale_in_lora_B": scale}
    report = lora_files.write_lora(dst, model_config, tree, scale, output_dtype(dtype), about)
    return {**report, "training_run": chosen, "dtype": dtype}


def run(args) -> None:
    report = export_lora(args.src, args.dst, dtype=args.dtype, step=args.step,
                         weights=args.weights, force=args.force)
    chosen = report["training_run"]
    print(f"exported the rank-{report['rank']} LoRA of {report['layers']} layers (scale "
          f"{report['scale']:g} folded into lora_B; step {chosen['step']}, {chosen['weights']} "
          f"weights) to {args.dst}, {report['dtype']}")
