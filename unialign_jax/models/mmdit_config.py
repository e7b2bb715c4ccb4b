"""Configuration of the SD3 / UniAlignment MMDiT, one dataclass for both layouts."""

from __future__ import annotations

import dataclasses
from typing import Any

from unialign_jax.configlib import JsonConfig

VARIANTS = ("unialignment", "sd3")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(JsonConfig):
    """Sizes and layout of the transformer (defaults: the released UniAlignment model).

    `variant="sd3"` is SD3-medium: last block context-pre-only, pooled-text term in the
    conditioning vector, `norm_out`/`proj_out` head. `variant="unialignment"` (spec section 3):
    all blocks full, timestep-only conditioning, image + text heads, null image tokens and the
    mid-layer alignment adapters.
    """

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    joint_attention_dim: int = 4096
    pos_embed_max_size: int = 192
    sample_size: int = 128
    variant: str = "unialignment"
    vocab_size: int | None = 32100   # None in a training config: the tokenizer's length
    num_null_tokens: int = 8
    adapter_hidden_dim: int = 2048
    teacher_dim: int = 3584
    pooled_projection_dim: int = 2048
    timestep_channels: int = 256

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_sd3(self) -> bool:
        return self.variant == "sd3"

    @property
    def num_scanned_layers(self) -> int:
        """Blocks run under `scan`: all of them, except SD3's context-pre-only last block."""
        return self.num_layers - 1 if self.is_sd3 else self.num_layers

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "MMDiTConfig":
        """From a diffusers `config.json` of SD3Transformer2DModel or SD3JointModelFlexible."""
        klass = d.get("_class_name")
        if klass not in ("SD3Transformer2DModel", "SD3JointModelFlexible"):
            raise ValueError(f"unsupported transformer class {klass!r}; expected "
                             "SD3Transformer2DModel (SD3) or SD3JointModelFlexible (UniAlignment)")
        if d.get("qk_norm") or d.get("dual_attention_layers"):
            raise ValueError("SD3.5 features (qk_norm, dual_attention_layers) are not supported; "
                             "SD3-medium and UniAlignment use neither")
        heads, head_dim = d["num_attention_heads"], d["attention_head_dim"]
        if d.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
            raise ValueError("caption_projection_dim must equal num_attention_heads * "
                             "attention_head_dim for joint attention")
        sd3 = klass == "SD3Transformer2DModel"
        defaults = cls()
        return cls(
            patch_size=d["patch_size"], in_channels=d["in_channels"],
            out_channels=d.get("out_channels") or d["in_channels"], num_layers=d["num_layers"],
            num_heads=heads, head_dim=head_dim, joint_attention_dim=d["joint_attention_dim"],
            pos_embed_max_size=d["pos_embed_max_size"], sample_size=d["sample_size"],
            variant="sd3" if sd3 else "unialignment",
            vocab_size=None if sd3 else d["vocab_size"],
            num_null_tokens=d.get("num_null_tokens", defaults.num_null_tokens),
            adapter_hidden_dim=d.get("adapter_hidden_dim", defaults.adapter_hidden_dim),
            teacher_dim=d.get("teacher_dim", defaults.teacher_dim),
            pooled_projection_dim=d.get("pooled_projection_dim", defaults.pooled_projection_dim))

    def as_unialignment(self, vocab_size: int,
                        adapter_widths: tuple[int, int] | None = None) -> "MMDiTConfig":
        """The UniAlignment layout with this model's sizes (the SD3 → UniAlignment port);
        `adapter_widths` = (hidden, teacher) of the alignment adapters, else the release's."""
        hidden, teacher = adapter_widths or (self.adapter_hidden_dim, self.teacher_dim)
        return dataclasses.replace(self, variant="unialignment", vocab_size=vocab_size,
                                   adapter_hidden_dim=hidden, teacher_dim=teacher)

    @classmethod
    def tiny(cls, **overrides) -> "MMDiTConfig":
        """A few-thousand-parameter model for tests and the CPU quickstart."""
        base = dict(num_layers=2, num_heads=2, head_dim=16, joint_attention_dim=32,
                    pos_embed_max_size=16, sample_size=8, vocab_size=64,
                    adapter_hidden_dim=24, teacher_dim=40, pooled_projection_dim=24)
        base.update(overrides)
        return cls(**base)
