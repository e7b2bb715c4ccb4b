"""Quickstart: a tiny UniAlignment trained from scratch on the synthetic shape corpus, on CPU.

`unialign-quickstart` builds the corpus, the tokenizer, the stand-in teacher features and a
small VAE fitted to the shapes, then fills in the paths below and calls the trainer; to run
it by hand:

  unialign-train --config quickstart --workdir /tmp/qs models.tokenizer=DIR models.vae_path=DIR \\
      data.tasks="{'t2i': ('SHARDS/t2i',), 'edit': ('SHARDS/edit',), 'compose': ('SHARDS/compose',)}"
"""

from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.models.t5 import T5Config
from unialign_jax.models.vae import VAEConfig
from unialign_jax.runs.config import (ComputeConfig, DataConfig, LossConfig, ModelsConfig,
                                          OptimizerConfig, RunConfig, TrainConfig)

def get_config() -> TrainConfig:
    return TrainConfig(
        models=ModelsConfig(
            transformer=MMDiTConfig(
                num_layers=4, num_heads=4, head_dim=32, joint_attention_dim=64, in_channels=4,
                out_channels=4, pos_embed_max_size=8, sample_size=8, vocab_size=None,
                num_null_tokens=4, adapter_hidden_dim=32, teacher_dim=32),
            # The random frozen T5 is the caption stream's only source of word order: 64
            # buckets give every offset of the 8 tokens its own (bidirectional T5 keeps
            # offsets below num_buckets / 4 exact).
            t5=T5Config(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=128,
                        num_layers=2, relative_attention_num_buckets=64,
                        relative_attention_max_distance=32),
            vae=VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1,
                          norm_num_groups=8, latent_channels=4)),
        compute=ComputeConfig(dtype="float32", param_dtype="float32",
                              frozen_param_dtype="float32", remat_policy="none"),
        # Every word is one token (`apps/quickstart.tokenizer_texts`): the longest caption
        # (two shapes) is 8 tokens with its `</s>`. Three text-to-image batches per editing
        # batch (the release alternates 1:1): the report scores generated shapes, and at
        # this size editing and caption steps compete with them for 4 layers. One
        # composition batch per 6 + 2 of those, with 250 more steps: the text-to-image and
        # editing steps stay 1500 and 500.
        data=DataConfig(resolution=32, max_length=8,
                        task_weights={"t2i": 6, "edit": 2, "compose": 1}),
        # A short run from scratch: a far higher lr than the release's 3e-5, decayed to 0 at
        # the last step. Held-out shape accuracy of this config (288 prompts) at lr 1e-3 /
        # 2e-3 / 4e-3: 0.66 / 0.75 / 0.89; 64 wide (head_dim 16), 1:1 tasks, caption
        # weight 3 and a constant lr 1e-3 drew blobs (0.48, chance 0.33).
        optimizer=OptimizerConfig(lr=4e-3, warmup_steps=100, cosine_end_step=-1,
                                  weight_decay=0.01, grad_clip_norm=2.0, ema_decay=0.99),
        # The release's loss weights; the alignment terms run against the stand-in
        # teacher's features.
        loss=LossConfig(block_depth=2),
        run=RunConfig(batch_size=32, micro_batch_per_device=32, num_steps=2250, log_every=10,
                      ckpt_every=500, keep_checkpoints=2, async_checkpoints=True),
    )
