"""The UniAlignment transformer in PyTorch at any size: what loads `unialign-convert export`'s
UniAlignment-layout folders (and the `transformer/` of `export-pipeline`) in PyTorch.

The release's `SD3JointModelFlexible` hard-codes its alignment adapters (1536 → 2048 → 3584)
and eight null image tokens, so it loads only full-size checkpoints; diffusers'
`SD3Transformer2DModel` loads none (its last block is context-pre-only, it has one output
head, no adapters). This class is the release's construction — diffusers' SD3 transformer
with a full last block, a timestep-only embedder, image and text heads, null image tokens
and the two adapters — with every width read from config.json (the exporter writes
`adapter_hidden_dim`, `teacher_dim` and, when not 8, `num_null_tokens`; the defaults are the
release's, so a release folder loads too). Module names, hence state-dict keys, and the
forward's arguments and six outputs are the release's; `from_pretrained`, `save_pretrained`
and PEFT LoRA loading (`load_lora_adapter`) come from diffusers. Tested against the release's
own outputs stored in ../shared/fixtures/unialignment_tiny (tests/test_torch_unialignment.py).

Where this differs from the release, only what the release cannot run changes:
- the timestep sinusoid is rounded to float16 as the release does, then cast to the
  embedder's dtype (the release feeds float16 into its Linear and relies on autocast);
- a LoRA scale passed in `joint_attention_kwargs` is undone after the call, as diffusers'
  SD3 does (the release never unscales, so its scales compound from call to call);
- the target image's tokens are the first ones of the joint sequence (the release splits
  it into 2 or 4 equal chunks, the same tokens for one edit image or three composition
  images of the target's size, and a shape error otherwise).

Needs torch and diffusers (the `torch` extra: `pip install -e '.[torch]'`; the `test` extra
has them too), and peft for LoRA files; nothing else in the package imports this module.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import apply_lora_scale
from torch import nn

TIMESTEP_CHANNELS = 256  # the sinusoid's width; the release (and diffusers' SD3) fix it
EDIT, COMPOSE = "img_edit", "img_compose"  # the release's data_type values with conditions


class TimestepProjEmbeddings(nn.Module):
    """SD3's timestep embedder without its pooled-text half (UniAlignment drops CLIP)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                   downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=TIMESTEP_CHANNELS,
                                                   time_embed_dim=embedding_dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        proj = self.time_proj(timestep).to(torch.float16)  # the release's rounding
        return self.timestep_embedder(proj.to(self.timestep_embedder.linear_1.weight.dtype))


class FeatureAdapter(nn.Module):
    """The release's alignment adapter (its image and text adapters are the same class):
    the mean over tokens, then Linear-SiLU-Linear-SiLU to the teacher's width."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, out),
                                nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x.transpose(1, 2)).squeeze(-1))


class SD3JointModelFlexible(SD3Transformer2DModel):
    """The release's UniAlignment transformer, every size from its config."""

    @register_to_config
    def __init__(self, vocab_size: int | None = None, sample_size: int = 128,
                 patch_size: int = 2, in_channels: int = 16, num_layers: int = 18,
                 attention_head_dim: int = 64, num_attention_heads: int = 18,
                 joint_attention_dim: int = 4096,
                 caption_projection_dim: int = 1152, pooled_projection_dim: int = 2048,
                 out_channels: int = 16, pos_embed_max_size: int = 96,
                 adapter_hidden_dim: int = 2048, teacher_dim: int = 3584,
                 num_null_tokens: int = 8):
        if vocab_size is None:  # what an SD3-layout config.json lacks
            raise ValueError("the config has no vocab_size: not a UniAlignment-layout "
                             "transformer (an SD3-layout export loads with diffusers' "
                             "SD3Transformer2DModel)")
        super().__init__(sample_size=sample_size, patch_size=patch_size,
                         in_channels=in_channels, num_layers=num_layers,
                         attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads,
                         joint_attention_dim=joint_attention_dim,
                         caption_projection_dim=caption_projection_dim,
                         pooled_projection_dim=pooled_projection_dim,
                         out_channels=out_channels, pos_embed_max_size=pos_embed_max_size)
        width = self.inner_dim
        # The text stream runs through every block (SD3's last block is context-pre-only).
        self.transformer_blocks[-1] = JointTransformerBlock(
            dim=width, num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim, context_pre_only=False)
        self.norm_out = None
        self.proj_out = None
        self.time_text_embed = TimestepProjEmbeddings(width)
        self.image_norm_out = AdaLayerNormContinuous(width, width, elementwise_affine=False,
                                                     eps=1e-6)
        self.image_proj_out = nn.Linear(width, patch_size * patch_size * self.out_channels)
        self.text_norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(width, vocab_size)
        self.null_image_embd = nn.Parameter(torch.randn(1, num_null_tokens, width) / width**0.5)
        self.siglip_adapter_img = FeatureAdapter(width, adapter_hidden_dim, teacher_dim)
        self.siglip_adapter_text = FeatureAdapter(width, adapter_hidden_dim, teacher_dim)

    @apply_lora_scale("joint_attention_kwargs")
    def forward(self, hidden_states: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor = None,
                edit_hidden_states: torch.Tensor | list[torch.Tensor] | None = None,
                pooled_projections: torch.Tensor | None = None,
                timestep: torch.Tensor = None,
                block_controlnet_hidden_states: list[torch.Tensor] | None = None,
                joint_attention_kwargs: dict | None = None, return_dict: bool = True,
                data_type: str | None = None, block_depth: int | None = None) -> tuple:
        """The release's forward: latents (N, C, H, W) or None (captioning: the null image
        tokens), T5 states (N, L, joint_attention_dim), timesteps (N,); `edit_hidden_states`
        is the edit image's latents (`data_type="img_edit"`) or a list of the composition
        images' (`"img_compose"`), otherwise ignored. `pooled_projections` is accepted and
        unused and `return_dict` ignored, as in the release. `joint_attention_kwargs` only
        carries a LoRA `scale`.

        Returns the release's six outputs as a tuple: the predicted velocity (N, C, H, W) —
        or, for captioning, the image tokens —, the text logits (N, L, vocab_size), the
        normalised image and text tokens, and the two adapters' features of block
        `block_depth` (1-based; None when it is not given)."""
        text_only = hidden_states is None
        if text_only:
            tokens = self.null_image_embd.repeat(encoder_hidden_states.shape[0], 1, 1)
        else:
            height, width = hidden_states.shape[-2:]
            tokens = self.pos_embed(hidden_states)
        num_image = tokens.shape[1]
        conditions = {EDIT: [edit_hidden_states], COMPOSE: edit_hidden_states}.get(data_type, [])
        tokens = torch.cat([tokens, *map(self.pos_embed, conditions)], dim=1)
        temb = self.time_text_embed(timestep)
        context = self.context_embedder(encoder_hidden_states)

        mid_image = mid_text = None
        for index, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, tokens = self._gradient_checkpointing_func(block, tokens, context, temb)
            else:
                context, tokens = block(hidden_states=tokens, encoder_hidden_states=context,
                                        temb=temb)
            if block_controlnet_hidden_states is not None:
                interval = len(self.transformer_blocks) // len(block_controlnet_hidden_states)
                tokens = tokens + block_controlnet_hidden_states[index // interval]
            if index + 1 == block_depth:
                mid_image = self.siglip_adapter_img(tokens[:, :num_image])
                mid_text = self.siglip_adapter_text(context)

        tokens = tokens[:, :num_image]
        if text_only:
            sample = tokens
        else:
            tokens = self.image_norm_out(tokens, temb)
            sample = self._unpatchify(self.image_proj_out(tokens), height, width)
        context = self.text_norm_out(context)
        return sample, self.text_proj_out(context), tokens, context, mid_image, mid_text

    def _unpatchify(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, H/p · W/p, p·p·C) patch outputs → (N, C, H, W)."""
        patch, channels = self.config.patch_size, self.out_channels
        out = patches.reshape(patches.shape[0], height // patch, width // patch, patch, patch,
                              channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], channels, height,
                                                           width)
