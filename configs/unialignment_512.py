"""The release's training recipe (spec section 4) at 512 px on a TPU pod slice.

AdamW lr 3e-5 (wd 0.01, betas 0.9/0.999, eps 1e-8), 2000 warmup steps then constant,
global batch 384 of micro-batches of 4 per chip with gradient accumulation, clipping at
global norm 2.0 of the *summed* micro-batch gradients, 80k steps, bf16 compute with fp32
weights (frozen T5-XXL and VAE in bf16), contrastive loss within each chip's micro-batch,
checkpoint every 5000 steps, log every 20. Parameters, optimizer state and EMA are
FSDP-sharded over all chips (mesh.fsdp=-1).

Set the model and data paths on the command line, e.g.

  unialign-train --config unialignment_512 --workdir gs://BUCKET/unialign_512 \\
      models.pipeline=/models/unialign_jax_sd3_medium \\
      data.tasks="{'t2i': ('/data/t2i',), 'edit': ('/data/edit',)}"

(the release alternates text-to-image and editing batches; a composition corpus joins the
mix as "{..., 'compose': ('/data/compose',)}", its weight in data.task_weights, 1 if unset).

`models.pipeline` is a folder converted with `unialign-convert pipeline` (SD3-medium: the
transformer is ported to the UniAlignment layout; or the released UniAlignment weights).
With 384 = 4 × chips × accumulation, use a chip count that divides 96 (8, 16, 32, 96) to
contrast groups of 4 rows as the release does, or change run.micro_batch_per_device to a
divisor of 384 / chips of at least 2 (6 on 64 chips, 3 on 128; a micro-batch of 1 is
refused, as it leaves the per-chip contrastive loss no negatives).
"""

from unialign_jax.runs.config import (ComputeConfig, DataConfig, LossConfig, MeshConfig,
                                          OptimizerConfig, RunConfig, TrainConfig)

# Gradient accumulation as the release does it: 8 GPUs × local batch 48 = 384, so each
# GPU runs 48 / 4 = 12 micro-batches and *sums* their gradients (each the gradient of its
# micro-batch's mean loss; FSDP averages over GPUs), then clips that sum at 2.0 and steps
# AdamW on it. Our step averages the micro-batches of the whole mesh (mean gradient g), so
# the release's update is AdamW(clip(12·g, 2.0)): gradient_scale = 12 gives exactly that —
# clipping at 2.0 / 12 ≈ 0.167 on the mean gradient and AdamW's eps relative to the sum —
# on any mesh and accumulation count.
RELEASE_MICRO_BATCHES_PER_GPU = 48 // 4


def get_config() -> TrainConfig:
    return TrainConfig(
        compute=ComputeConfig(dtype="bfloat16", param_dtype="float32",
                              frozen_param_dtype="bfloat16", remat_policy="nothing_saveable"),
        data=DataConfig(resolution=512, max_length=256, workers=8),
        optimizer=OptimizerConfig(lr=3e-5, warmup_steps=2000, weight_decay=0.01, b1=0.9,
                                  b2=0.999, eps=1e-8, grad_clip_norm=2.0,
                                  gradient_scale=float(RELEASE_MICRO_BATCHES_PER_GPU),
                                  ema_decay=0.9995),
        loss=LossConfig(image_weight=1.0, caption_weight=0.2, contrastive_weight=0.05,
                        align_weight=0.1, block_depth=8, null_prompt_prob=0.1,
                        contrastive_scope="device"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        run=RunConfig(batch_size=384, micro_batch_per_device=4, num_steps=80_000,
                      log_every=20, ckpt_every=5000, keep_checkpoints=3,
                      async_checkpoints=True),
    )
