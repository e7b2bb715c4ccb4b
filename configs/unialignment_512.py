"""The release's training recipe (spec section 4) at 512 px on a TPU pod slice.

AdamW lr 3e-5 (wd 0.01, betas 0.9/0.999, eps 1e-8), 2000 warmup steps then constant,
global batch 384 of micro-batches of 4 per chip with gradient accumulation, clipping at
global norm 2.0, EMA 0.9995, 80k steps, bf16 compute with fp32 weights (frozen T5-XXL and
VAE in bf16), checkpoint every 5000 steps, log every 20. Parameters, optimizer state and
EMA are FSDP-sharded over all chips (mesh_fsdp=-1).

Set the model and data paths on the command line, e.g.

  unialign-train --config configs/unialignment_512.py --workdir gs://BUCKET/unialign_512 \\
      pipeline=/models/unialign_jax_sd3_medium \\
      t2i_shards="('/data/t2i',)" edit_shards="('/data/edit',)"

`pipeline` is a folder converted with `unialign-convert pipeline` (SD3-medium: the
transformer is ported to the UniAlignment layout; or the released UniAlignment weights).
With 384 = 4 × chips × accumulation, use a chip count that divides 96 (8, 16, 32, 96) or
change micro_batch_per_device (e.g. 1 or 2 on 64 or 128 chips; 6 on 64 chips).
"""

from unialign_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        resolution=512, max_length=256,
        batch_size=384, micro_batch_per_device=4, num_steps=80_000,
        lr=3e-5, warmup_steps=2000, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip_norm=2.0, ema_decay=0.9995,
        image_weight=1.0, caption_weight=0.2, contrastive_weight=0.05, align_weight=0.1,
        block_depth=8, null_prompt_prob=0.1,
        dtype="bfloat16", param_dtype="float32", frozen_param_dtype="bfloat16",
        remat_policy="nothing_saveable", mesh_data=1, mesh_fsdp=-1, mesh_tensor=1,
        log_every=20, ckpt_every=5000, keep_checkpoints=3, async_checkpoints=True,
        data_workers=8,
    )
