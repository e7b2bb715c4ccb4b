"""Diffusers' names of the MMDiT's linear layers: our module path → diffusers module name.

One table for every file that names layers the diffusers way: the converter maps each
tensor with it (`unialign_convert.transformer_keys`), LoRA files map their adapted layers
with it (`checkpoints.lora_files`), so the two cannot disagree.
"""

from __future__ import annotations

from unialign_jax.models.mmdit_config import MMDiTConfig

# Our module path (inside a block) → diffusers module name.
BLOCK_MODULES = {
    ("norm1",): "norm1.linear",
    ("norm1_context",): "norm1_context.linear",
    ("attn", "to_q"): "attn.to_q",
    ("attn", "to_k"): "attn.to_k",
    ("attn", "to_v"): "attn.to_v",
    ("attn", "add_q_proj"): "attn.add_q_proj",
    ("attn", "add_k_proj"): "attn.add_k_proj",
    ("attn", "add_v_proj"): "attn.add_v_proj",
    ("attn", "to_out"): "attn.to_out.0",
    ("attn", "to_add_out"): "attn.to_add_out",
    ("ff", "proj_in"): "ff.net.0.proj",
    ("ff", "proj_out"): "ff.net.2",
    ("ff_context", "proj_in"): "ff_context.net.0.proj",
    ("ff_context", "proj_out"): "ff_context.net.2",
}
TOP_MODULES = {
    ("time_embed", "linear_1"): "time_text_embed.timestep_embedder.linear_1",
    ("time_embed", "linear_2"): "time_text_embed.timestep_embedder.linear_2",
    ("pooled_embed", "linear_1"): "time_text_embed.text_embedder.linear_1",
    ("pooled_embed", "linear_2"): "time_text_embed.text_embedder.linear_2",
    ("context_embedder",): "context_embedder",
    ("norm_out", "linear"): "norm_out.linear",
    ("proj_out",): "proj_out",
    ("image_norm_out", "linear"): "image_norm_out.linear",
    ("image_proj_out",): "image_proj_out",
    ("text_proj_out",): "text_proj_out",
    ("adapter_img", "fc_1"): "siglip_adapter_img.fc.0",
    ("adapter_img", "fc_2"): "siglip_adapter_img.fc.2",
    ("adapter_text", "fc_1"): "siglip_adapter_text.fc.0",
    ("adapter_text", "fc_2"): "siglip_adapter_text.fc.2",
}


def diffusers_module(path: tuple[str, ...], config: MMDiTConfig,
                     layer: int | None = None) -> str:
    """The diffusers name of our linear module at `path`; `layer` picks one block of the
    stacked `blocks` (SD3's unstacked `final_block` is diffusers' last block)."""
    if path[0] == "blocks":
        return f"transformer_blocks.{layer}.{BLOCK_MODULES[path[1:]]}"
    if path[0] == "final_block":
        return f"transformer_blocks.{config.num_layers - 1}.{BLOCK_MODULES[path[1:]]}"
    return TOP_MODULES[path]
