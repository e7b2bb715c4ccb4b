"""`unialign-convert`: released PyTorch weights ↔ unialign_jax checkpoints.

Every subcommand is one row of `COMMANDS`: its texts, its options and the function that
runs it; the argument parser is built from the table, so all subcommands share SRC DST,
--force, the dtype choices and the error handling.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from unialign_convert import (diffusers_pipeline, export, export_lora, export_pipeline, from_run,
                              reruns, t5, transformer, vae)
from unialign_convert.export import DEFAULT_MAX_SHARD_SIZE
from unialign_convert.mask_embedding import DEFAULT_MASK_TOKEN_ID
from unialign_convert.param_mapping import DTYPE_NAMES
from unialign_convert.safetensors_io import ConversionError
from unialign_jax import compilation_cache, files
from unialign_jax.checkpoints.io import CheckpointError


@dataclasses.dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def option(*flags: str, **kwargs) -> Option:
    return Option(flags, kwargs)


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], None]   # does the work
    help: str
    description: str
    src: str             # what SRC is
    options: tuple[Option, ...] = ()
    dst: str = "output folder (must not exist or be empty)"


DTYPE = option("--dtype", choices=DTYPE_NAMES, default="float32",
               help="stored parameter dtype (default: %(default)s)")
MASK_EMBEDDING = option(
    "--mask-embedding", metavar="FILE",
    help="UniAlignment's learned mask embedding (.pth torch tensor as released, .safetensors "
         "or .npy); replaces the text encoder's row of the mask token <extra_id_0>")

PIPELINE_DTYPES = (
    option("--dtype", choices=DTYPE_NAMES, default="float32",
           help="stored dtype of the transformer and text encoder (default: %(default)s)"),
    option("--vae-dtype", choices=DTYPE_NAMES, default="float32",
           help="stored dtype of the VAE (default: %(default)s, as SD3 runs it)"))
MAX_SHARD_SIZE = option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help="largest safetensors file, e.g. 10GB or 500MB; a model above it "
                             "is sharded with an index file (default: %(default)s)")
RUN_OPTIONS = (  # choosing the weights of a training work dir
    option("--step", type=int, default=None,
           help="checkpoint step of a training work dir (default: the latest)"),
    option("--ema", dest="weights", action="store_const", const="ema", default=None,
           help="the EMA weights (the default when the run keeps an EMA)"),
    option("--raw", dest="weights", action="store_const", const="raw",
           help="the raw (optimizer's) weights instead of the EMA"))

COMMANDS = {
    "transformer": Command(
        transformer.run, "an SD3Transformer2DModel or SD3JointModelFlexible folder",
        "Convert a diffusers transformer folder (config.json + safetensors, sharded or not), "
        "or with --config a training checkpoint of the release's train.py, into an Orbax "
        "checkpoint folder loadable by unialign_jax.load_transformer.",
        "diffusers transformer folder; with --config: a train.py checkpoint, either one step "
        "folder (NNNNNNN/ with consolidated.00-of-01.safetensors) or a run (--results_dir or "
        "its checkpoints/ folder: the newest finished step, or --step)",
        (DTYPE,
         option("--config", metavar="FILE", default=None,
                help="the transformer's config.json for a train.py checkpoint, which stores "
                     "none: UniAlignment's, or SD3-medium's with --vocab-size"),
         option("--step", type=int, default=None,
                help="with --config and a run folder: the step to convert (default: the "
                     "newest with its resume_step.txt)"),
         option("--to", choices=["unialignment"], default=None,
                help="port an SD3 model into the UniAlignment layout: keep same-name, "
                     "same-shape weights, initialise the rest, drop the pooled-text embedder "
                     "and the old output head"),
         option("--vocab-size", type=int, default=None,
                help="text-head vocabulary (the tokenizer's length, 32100 for T5)"),
         option("--adapter-widths", type=int, nargs=2, metavar=("HIDDEN", "TEACHER"),
                default=None,
                help="with --to unialignment or an SD3 --config: hidden and output widths of "
                     "the alignment adapters (default: the release's 2048 3584; the output "
                     "width must equal the teacher's feature size)"))),
    "t5": Command(
        t5.run, "T5 v1.1 text encoder (transformers T5EncoderModel folder)",
        "Convert a transformers T5EncoderModel folder (config.json + model.safetensors, or "
        "sharded with model.safetensors.index.json) into a unialign_jax T5 checkpoint "
        "loadable with unialign_jax.load_t5.",
        "transformers T5EncoderModel folder",
        (DTYPE, MASK_EMBEDDING,
         option("--mask-token-id", type=int, default=DEFAULT_MASK_TOKEN_ID,
                help="row replaced by --mask-embedding (default: %(default)s, <extra_id_0>)"))),
    "vae": Command(
        vae.run, "SD3 VAE (diffusers AutoencoderKL folder)",
        "Convert a diffusers AutoencoderKL folder (config.json + "
        "diffusion_pytorch_model.safetensors) with 16 latent channels and no quant convs into "
        "a unialign_jax VAE checkpoint loadable with unialign_jax.load_vae.",
        "diffusers AutoencoderKL folder", (DTYPE,)),
    "pipeline": Command(
        diffusers_pipeline.run, "a whole diffusers folder (SD3-medium or UniAlignment layout)",
        "Convert a diffusers pipeline folder into one unialign_jax folder loadable with "
        "unialign_jax.load_pipeline. SD3-medium layout: transformer/, vae/, text_encoder_3/, "
        "tokenizer_3/, scheduler/ (CLIP encoders ignored; the transformer is ported to the "
        "UniAlignment layout). UniAlignment layout: transformer/, vae/, text_encoder/, "
        "tokenizer/, scheduler/.",
        "diffusers pipeline folder",
        (*PIPELINE_DTYPES, MASK_EMBEDDING)),
    "from-run": Command(
        from_run.run, "a training work dir → a pipeline folder",
        "Turn a unialign-train work dir into a pipeline folder loadable with "
        "unialign_jax.load_pipeline and unialign-sample: the trained transformer of one "
        "checkpoint step with the run's frozen T5, VAE and tokenizer (random frozen models "
        "are redrawn from the run's seed; the tokenizer pads with </s> as in training). "
        "load_pipeline and unialign-sample --ckpt also open a work dir directly.",
        "training work dir (unialign-train --workdir)",
        RUN_OPTIONS),
    "export": Command(
        export.run, "our transformer → a diffusers folder (PyTorch)",
        "Export a converted transformer folder, or a training work dir's transformer (EMA "
        "weights by default when kept), as a diffusers folder: config.json + "
        "diffusion_pytorch_model.safetensors, sharded with its index file above "
        "--max-shard-size. The UniAlignment layout loads into "
        "unialign_convert.torch_unialignment.SD3JointModelFlexible (any size; the release's "
        "own class at full size only), the SD3 layout into diffusers' SD3Transformer2DModel, "
        "with no missing or unexpected key. Host memory: about one copy of the weights.",
        "converted transformer folder or training work dir",
        (DTYPE, MAX_SHARD_SIZE, *RUN_OPTIONS)),
    "export-pipeline": Command(
        export_pipeline.run, "a pipeline folder → the release's diffusers layout",
        "Export a pipeline folder (unialign-convert pipeline / from-run) in the release's "
        "layout: transformer/, text_encoder/ (T5EncoderModel), vae/, tokenizer/, scheduler/ "
        "and model_index.json; `unialign-convert pipeline` reads it back unchanged.",
        "pipeline folder",
        (*PIPELINE_DTYPES, MAX_SHARD_SIZE)),
    "export-lora": Command(
        export_lora.run, "a LoRA run's factors → a diffusers / PEFT LoRA file",
        "Export the LoRA factors of a training work dir trained with lora.rank > 0 (EMA "
        "weights by default when kept) as one safetensors file in the diffusers / PEFT "
        "naming (transformer.<module>.lora_A.weight (r, in), .lora_B.weight (out, r)), the "
        "run's alpha / rank folded into lora_B so that every loader applies the same "
        "update: transformer.load_lora_adapter(DST, prefix='transformer') in PyTorch (peft) "
        "on unialign_convert.torch_unialignment.SD3JointModelFlexible loaded from the base's "
        "export, UniAlignPipeline.load_lora(DST) or unialign-sample --lora DST here. Also "
        "writes DST.produced_by.json: what made DST, so that a rerun finds it done.",
        "LoRA training work dir (unialign-train ... lora.rank=R)",
        (DTYPE, *RUN_OPTIONS), dst="output .safetensors file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unialign-convert",
        description="Convert diffusers / transformers PyTorch folders (safetensors) into "
                    "unialign_jax checkpoint folders (Orbax parameters + JSON configuration), "
                    "and back. Tensors are streamed one at a time; nothing is written at DST "
                    "unless the whole conversion succeeds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description)
        p.add_argument("src", metavar="SRC", help=command.src)
        p.add_argument("dst", metavar="DST", help=command.dst)
        for opt in command.options:
            p.add_argument(*opt.flags, **opt.kwargs)
        p.add_argument("--force", action="store_true",
                       help="overwrite DST (without it, rerunning a finished conversion "
                            "changes nothing and exits 0)")
        compilation_cache.add_arguments(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    compilation_cache.setup_from_args(args)
    run = COMMANDS[args.command].run
    wanted = reruns.request(args, COMMANDS[args.command].options)
    try:
        if reruns.already_done(args.dst, wanted, args.force):
            print(f"{args.dst} already holds this conversion (same source and options): "
                  "nothing to do")
            return 0
        with files.recording(args.dst, wanted):
            run(args)
        if reruns.is_file_output(args.dst):  # a folder holds its record already
            files.write_json(reruns.record_path(args.dst), wanted)
    except (ConversionError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"unialign-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:
        if not files.is_disk_full(e):
            raise
        print(f"unialign-convert {args.command}: error: {files.disk_full_message(args.dst)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
