"""`unialign-convert pipeline`: a whole diffusers folder → one unialign_jax pipeline folder.

Accepts SD3-medium's layout (T5 in `text_encoder_3/`, `tokenizer_3/`; the CLIP encoders are
ignored; the transformer is ported into the UniAlignment layout with the tokenizer's length
as its text vocabulary) and UniAlignment's (`text_encoder/`, `tokenizer/`). The components'
configs, their fit with each other and every weight file's header are checked before the
first tensor is converted, and DST appears only when every component succeeded.
"""

from __future__ import annotations

import os
import shutil
import sys

from unialign_convert.mask_embedding import read_mask_embedding
from unialign_convert.safetensors_io import ConversionError, TensorSource, read_config
from unialign_convert.t5 import config_from_transformers, write_t5
from unialign_convert.transformer import write_transformer
from unialign_convert.vae import config_from_diffusers, write_vae
from unialign_jax import files
from unialign_jax.diffusion.flow import NUM_TRAIN_TIMESTEPS
from unialign_jax.checkpoints import registry
from unialign_jax.checkpoints.pipeline_folder import COMPONENT_DIRS, PipelineIndex, write_scheduler
from unialign_jax.text.tokenizer import load_tokenizer, mask_token_id

# Source sub-folder of each component, per layout.
LAYOUTS = {
    "sd3": {"transformer": "transformer", "text_encoder": "text_encoder_3",
            "tokenizer": "tokenizer_3", "vae": "vae", "scheduler": "scheduler"},
    "unialignment": {"transformer": "transformer", "text_encoder": "text_encoder",
                     "tokenizer": "tokenizer", "vae": "vae", "scheduler": "scheduler"},
}
WEIGHTS_NAMES = {"transformer": "diffusion_pytorch_model", "text_encoder": "model",
                 "vae": "diffusion_pytorch_model"}
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# FlowMatchEulerDiscreteScheduler settings that, when set, give another schedule than the
# fixed `shift` our sampler draws (`use_dynamic_shifting` makes the release's pipeline
# compute a resolution-dependent `mu` from base/max_shift); refused rather than ignored.
SCHEDULE_SETTINGS = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas",
                     "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling")


def detect_layout(src: str) -> str:
    """'sd3' when the folder has SD3's third (T5) text encoder, else 'unialignment'; the
    chosen layout's component folders must all exist."""
    if not os.path.isdir(src):
        raise ConversionError(f"pipeline folder not found: {src}")
    layout = "sd3" if os.path.isdir(os.path.join(src, "text_encoder_3")) else "unialignment"
    missing = [d for d in LAYOUTS[layout].values() if not os.path.isdir(os.path.join(src, d))]
    if missing:
        raise ConversionError(f"{src}: missing component folders {missing} for the {layout} "
                              f"layout (expected {sorted(LAYOUTS[layout].values())})")
    return layout


def read_scheduler(folder: str) -> dict:
    path = os.path.join(folder, "scheduler_config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no scheduler_config.json")
    try:
        cfg = files.read_json(path)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if cfg.get("_class_name") != SCHEDULER_CLASS:
        raise ConversionError(f"{path}: expected a {SCHEDULER_CLASS}, found "
                              f"{cfg.get('_class_name')!r}")
    changed = {k: cfg[k] for k in SCHEDULE_SETTINGS if cfg.get(k) not in (None, False)}
    if changed:
        raise ConversionError(
            f"{path}: {changed} change the sigma schedule, which here is the fixed shift "
            "(SD3-medium's and the release's scheduler, shift only); remove them to sample "
            "with the plain shifted schedule")
    return {"shift": float(cfg.get("shift", 1.0)),
            "num_train_timesteps": int(cfg.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))}


def check_compatible(src: str, layout: str, tokenizer, mask_embedding: str | None
                     ) -> tuple[bool, int]:
    """Validates the components against each other from their configs, every weight file's
    header and the mask embedding file, before anything is converted.

    Returns (whether the transformer must be ported to the UniAlignment layout, mask id).
    """
    dirs = {k: os.path.join(src, v) for k, v in LAYOUTS[layout].items()}
    for name, weights in WEIGHTS_NAMES.items():
        TensorSource.from_folder(dirs[name], weights)
    t5 = config_from_transformers(read_config(dirs["text_encoder"]), dirs["text_encoder"])
    config_from_diffusers(read_config(dirs["vae"]), dirs["vae"])
    transformer = read_config(dirs["transformer"])
    vocab, mask_id = len(tokenizer), mask_token_id(tokenizer)
    port = transformer.get("_class_name") == "SD3Transformer2DModel"
    problems = []
    if transformer.get("joint_attention_dim") != t5.d_model:
        problems.append(f"transformer joint_attention_dim {transformer.get('joint_attention_dim')}"
                        f" differs from the text encoder's d_model {t5.d_model}")
    if vocab > t5.vocab_size:
        problems.append(f"tokenizer has {vocab} ids but the text encoder embeds {t5.vocab_size}")
    if not port and transformer.get("vocab_size") != vocab:
        problems.append(f"transformer text vocabulary {transformer.get('vocab_size')} differs "
                        f"from the tokenizer length {vocab}")
    if problems:
        raise ConversionError(f"{src}: components do not fit together: " + "; ".join(problems))
    if mask_embedding:
        read_mask_embedding(mask_embedding, t5.d_model)
    return port, mask_id


def write_pipeline(src: str, out_dir: str, *, dtype: str = "float32",
                   vae_dtype: str = "float32", mask_embedding: str | None = None) -> PipelineIndex:
    """Converts the pipeline folder `src` into the existing folder `out_dir`; returns the index."""
    layout = detect_layout(src)
    dirs = {k: os.path.join(src, v) for k, v in LAYOUTS[layout].items()}
    scheduler = read_scheduler(dirs["scheduler"])
    try:
        tokenizer = load_tokenizer(dirs["tokenizer"])
    except (OSError, ValueError) as e:
        raise ConversionError(f"{dirs['tokenizer']}: not a loadable T5 tokenizer ({e})") from None
    port, mask_id = check_compatible(src, layout, tokenizer, mask_embedding)
    out = {k: os.path.join(out_dir, v) for k, v in COMPONENT_DIRS.items()}

    shutil.copytree(dirs["tokenizer"], out["tokenizer"])
    for name in ("transformer", "text_encoder", "vae"):
        os.makedirs(out[name])
    print(f"[1/3] transformer ({'SD3 → UniAlignment' if port else 'UniAlignment'})",
          file=sys.stderr)
    report = write_transformer(dirs["transformer"], out["transformer"], dtype=dtype,
                               to_unialignment=port, vocab_size=len(tokenizer) if port else None)
    print("[2/3] text encoder", file=sys.stderr)
    write_t5(dirs["text_encoder"], out["text_encoder"], dtype=dtype,
             mask_embedding=mask_embedding, mask_token_id=mask_id)
    print("[3/3] VAE", file=sys.stderr)
    write_vae(dirs["vae"], out["vae"], dtype=vae_dtype)

    write_scheduler(out_dir, scheduler)
    index = PipelineIndex(
        source=os.path.abspath(src), layout=layout, vocab_size=len(tokenizer),
        mask_token_id=mask_id,
        mask_embedding=os.path.abspath(mask_embedding) if mask_embedding else None,
        dtype=dtype, vae_dtype=vae_dtype, transformer_initialised=tuple(report["initialised"]))
    index.write(out_dir)
    return index


convert_pipeline = files.into_new_folder(write_pipeline)


def run(args) -> None:
    index = convert_pipeline(args.src, args.dst, dtype=args.dtype, vae_dtype=args.vae_dtype,
                             mask_embedding=args.mask_embedding, force=args.force)
    print(f"converted the {index.layout} pipeline into {args.dst} "
          f"(load it with unialign_jax.load_pipeline)")
    if index.transformer_initialised:
        print(f"  transformer tensors initialised fresh: {len(index.transformer_initialised)} "
              f"(listed in {args.dst}/transformer/{registry.CONVERSION_FILE})")
    if not index.mask_embedding:
        print(f"  note: no --mask-embedding; row {index.mask_token_id} keeps T5's own "
              "<extra_id_0> embedding", file=sys.stderr)
