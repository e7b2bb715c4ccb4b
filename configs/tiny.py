"""A few-thousand-parameter model in float32 for tests and smoke runs on CPU (seconds per
step after compiling). Data paths and the tokenizer come from the command line; the
transformer's vocabulary is the tokenizer's length (T5's table must be at least as large).
"""

from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.models.t5 import T5Config
from unialign_jax.models.vae import VAEConfig
from unialign_jax.runs.config import (ComputeConfig, DataConfig, LossConfig, ModelsConfig,
                                          OptimizerConfig, RunConfig, TrainConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        models=ModelsConfig(
            transformer=MMDiTConfig.tiny(vocab_size=None),
            t5=T5Config(vocab_size=256, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                        num_layers=2, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16),
            vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)),
        compute=ComputeConfig(dtype="float32", param_dtype="float32",
                              frozen_param_dtype="float32", remat_policy="nothing_saveable"),
        data=DataConfig(resolution=16, max_length=8),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0),
        loss=LossConfig(block_depth=1, null_prompt_prob=0.5, allow_missing_teacher=True),
        run=RunConfig(batch_size=8, micro_batch_per_device=4, num_steps=4, log_every=1,
                      ckpt_every=2, keep_checkpoints=2, tensorboard=False, progress_bar=False),
    )
