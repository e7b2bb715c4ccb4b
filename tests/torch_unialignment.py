"""A PyTorch stand-in for the release's `SD3JointModelFlexible` (UniAlignment layout), for tests.

The release class hard-codes the alignment adapters' widths (1536 → 2048 → 3584), so a
tiny model cannot be built with it; this stand-in is the same construction — diffusers'
SD3 transformer with a full last block, a timestep-only embedder (its sinusoid rounded to
float16, as the release does), an image head, a text head, null image tokens and the two
adapters — with every width taken from the config. Its module names, hence its state-dict
keys, are the release's. `forward` covers text-to-image (image and text outputs, not the
adapters' features); tests
check it against the release's own outputs stored with ../shared/fixtures/unialignment_tiny
before trusting it.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from torch import nn

TIMESTEP_CHANNELS = 256


class TimeEmbedding(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.time_proj = Timesteps(TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                   downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, width)

    def forward(self, timestep):
        proj = self.time_proj(timestep).to(torch.float16).float()
        return self.timestep_embedder(proj)


class Adapter(nn.Module):
    """The release's alignment adapter's parameters: its `fc` Linear-SiLU-Linear-SiLU."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, out),
                                nn.SiLU())


class UniAlignmentStandIn(SD3Transformer2DModel):
    @register_to_config
    def __init__(self, vocab_size: int, sample_size: int = 128, patch_size: int = 2,
                 in_channels: int = 16, num_layers: int = 18, attention_head_dim: int = 64,
                 num_attention_heads: int = 18, joint_attention_dim: int = 4096,
                 caption_projection_dim: int = 1152, pooled_projection_dim: int = 2048,
                 out_channels: int = 16, pos_embed_max_size: int = 96,
                 adapter_hidden_dim: int = 2048, teacher_dim: int = 3584,
                 num_null_tokens: int = 8):
        super().__init__(sample_size=sample_size, patch_size=patch_size,
                         in_channels=in_channels, num_layers=num_layers,
                         attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads,
                         joint_attention_dim=joint_attention_dim,
                         caption_projection_dim=caption_projection_dim,
                         pooled_projection_dim=pooled_projection_dim,
                         out_channels=out_channels, pos_embed_max_size=pos_embed_max_size)
        width = self.inner_dim
        self.transformer_blocks[-1] = JointTransformerBlock(
            dim=width, num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim, context_pre_only=False)
        self.norm_out = None
        self.proj_out = None
        self.time_text_embed = TimeEmbedding(width)
        self.image_norm_out = AdaLayerNormContinuous(width, width, elementwise_affine=False,
                                                     eps=1e-6)
        self.image_proj_out = nn.Linear(width, patch_size * patch_size * self.out_channels)
        self.text_norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(width, vocab_size)
        self.null_image_embd = nn.Parameter(torch.randn(1, num_null_tokens, width) / width**0.5)
        self.siglip_adapter_img = Adapter(width, adapter_hidden_dim, teacher_dim)
        self.siglip_adapter_text = Adapter(width, adapter_hidden_dim, teacher_dim)

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        """Text-to-image: (image output NCHW, text logits)."""
        height, width = hidden_states.shape[-2:]
        tokens = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep)
        context = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            context, tokens = block(hidden_states=tokens, encoder_hidden_states=context,
                                    temb=temb)
        patch, channels = self.config.patch_size, self.out_channels
        out = self.image_proj_out(self.image_norm_out(tokens, temb))
        out = out.reshape(out.shape[0], height // patch, width // patch, patch, patch, channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], channels, height, width)
        return out, self.text_proj_out(self.text_norm_out(context))
