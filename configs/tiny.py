"""A few-thousand-parameter model in float32 for tests and smoke runs on CPU (seconds per
step after compiling). Data paths and the tokenizer come from the command line; the
transformer's vocabulary is the tokenizer's length (T5's table must be at least as large).
"""

from unialign_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        transformer=dict(num_layers=2, num_heads=2, head_dim=16, joint_attention_dim=32,
                         pos_embed_max_size=16, sample_size=8, adapter_hidden_dim=24,
                         teacher_dim=40),
        t5=dict(vocab_size=256, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
        vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
        resolution=16, max_length=8,
        batch_size=8, micro_batch_per_device=4, num_steps=4, block_depth=1,
        lr=1e-3, warmup_steps=0, null_prompt_prob=0.5,
        dtype="float32", param_dtype="float32", frozen_param_dtype="float32",
        remat_policy="nothing_saveable", log_every=1, ckpt_every=2, keep_checkpoints=2,
        tensorboard=False, progress_bar=False,
    )
