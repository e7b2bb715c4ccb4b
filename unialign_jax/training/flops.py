"""Model FLOPs of a UniAlignment train step, counted from the configs: MFU's numerator.

Counted: every matrix product and convolution (2 FLOPs per multiply-add) of the image and
text streams of both transformer passes (patch / context / time embeddings, modulation,
q/k/v/out projections, attention scores and mixing over the joint sequence, MLPs, output
heads, alignment adapters), the frozen T5 encodes and the VAE encoder. Backward = 2 ×
forward for the trained transformer; the frozen models run forward only; rematerialised
recomputation is not counted (model FLOPs, not hardware FLOPs). Elementwise work, norms and
softmax are left out, as MFU conventionally does.
"""

from __future__ import annotations

import dataclasses
import re

from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.models.t5 import T5Config
from unialign_jax.models.vae import VAEConfig

# bf16 dense peak TFLOP/s per chip, by `jax.devices()[0].device_kind` pattern.
PEAK_TFLOPS = (
    (r"H200", 989.0),
    (r"H100", 989.0),
    (r"A100", 312.0),
    (r"TPU v6", 918.0),
    (r"TPU v5p", 459.0),
    (r"TPU v5( lite|e)", 197.0),
    (r"TPU v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The chip's bf16 peak, or None for a chip not in the table (CPUs)."""
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, device_kind)),
                None)


def matmul(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def attention(queries: int, keys: int, width: int) -> int:
    """Scores (q·kᵀ) and mixing (p·v) over all heads: 2 · 2·q·k·width."""
    return 4 * queries * keys * width


def mmdit_forward(cfg: MMDiTConfig, image_tokens: int, text_tokens: int,
                  target_tokens: int | None = None, adapters: bool = True) -> int:
    """One sample through the MMDiT: `image_tokens` (target + condition tokens, or the null
    tokens of a text-only pass), `text_tokens`, `target_tokens` reaching the image head."""
    w, p2 = cfg.width, cfg.patch_size ** 2
    target = image_tokens if target_tokens is None else target_tokens
    n = image_tokens + text_tokens
    flops = (matmul(image_tokens, p2 * cfg.in_channels, w)          # patch embedding
             + matmul(text_tokens, cfg.joint_attention_dim, w)      # context embedder
             + matmul(1, cfg.timestep_channels, w) + matmul(1, w, w))
    per_stream = lambda tokens: 4 * matmul(tokens, w, w) + 2 * matmul(tokens, w, 4 * w)  # noqa
    block = (2 * matmul(1, w, 6 * w)                                # modulation, both streams
             + per_stream(image_tokens) + per_stream(text_tokens) + attention(n, n, w))
    flops += cfg.num_layers * block
    flops += (matmul(1, w, 2 * w) + matmul(target, w, p2 * cfg.out_channels)   # image head
              + matmul(text_tokens, w, cfg.vocab_size or 0))                   # text head
    if adapters:
        flops += 2 * (matmul(1, w, cfg.adapter_hidden_dim)
                      + matmul(1, cfg.adapter_hidden_dim, cfg.teacher_dim))
    return flops


def t5_forward(cfg: T5Config, length: int) -> int:
    inner = cfg.num_heads * cfg.head_dim
    layer = (4 * matmul(length, cfg.d_model, inner) + attention(length, length, inner)
             + 2 * matmul(length, cfg.d_model, cfg.d_ff) + matmul(length, cfg.d_ff, cfg.d_model))
    return cfg.num_layers * layer


def conv(height: int, width: int, kernel: int, cin: int, cout: int) -> int:
    return 2 * height * width * kernel * kernel * cin * cout


def vae_encode(cfg: VAEConfig, height: int, width: int) -> int:
    """One image through the encoder (our `models.vae.Encoder`, diffusers' layout)."""
    ch = cfg.block_out_channels
    flops = conv(height, width, 3, cfg.in_channels, ch[0])
    h, w = height, width
    for i, cout in enumerate(ch):
        cin = ch[max(i - 1, 0)]
        for r in range(cfg.layers_per_block):
            c_in = cin if r == 0 else cout
            flops += conv(h, w, 3, c_in, cout) + conv(h, w, 3, cout, cout)
            flops += conv(h, w, 1, c_in, cout) if c_in != cout else 0
        if i < len(ch) - 1:
            h, w = h // 2, w // 2
            flops += conv(h, w, 3, cout, cout)                       # stride-2 downsampler
    c = ch[-1]
    resnet = 2 * conv(h, w, 3, c, c)
    flops += 2 * resnet + 4 * matmul(h * w, c, c) + attention(h * w, h * w, c)   # mid block
    return flops + conv(h, w, 3, c, 2 * cfg.latent_channels)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one training sample looks like."""

    resolution: int                 # pixels per side
    text_tokens: int                # caption / instruction length
    condition_images: int = 0       # 0: text-to-image, 1: edit, 3: compose
    encodes_images: bool = True     # False: cached VAE moments (data.cached_latents)


def sample_flops(transformer: MMDiTConfig, t5: T5Config, vae: VAEConfig,
                 shape: StepShape) -> dict[str, int]:
    """Model FLOPs of one training sample, by part (and 'total')."""
    side = shape.resolution // (2 ** (len(vae.block_out_channels) - 1)) // transformer.patch_size
    target = side * side
    image = mmdit_forward(transformer, target * (1 + shape.condition_images),
                          shape.text_tokens, target)
    caption = mmdit_forward(transformer, target, shape.text_tokens)
    parts = {"image_pass": 3 * image, "caption_pass": 3 * caption,        # fwd + 2× bwd
             "t5": 2 * t5_forward(t5, shape.text_tokens),                  # instruction, caption
             "vae": (1 + shape.condition_images) * vae_encode(vae, shape.resolution,
                                                              shape.resolution)
             * shape.encodes_images}
    parts["total"] = sum(parts.values())
    return parts


def mfu(samples_per_second: float, flops_per_sample: float, chips: int,
        device_kind: str) -> float | None:
    """Achieved model FLOP/s over the chips' peak (None when the peak is unknown)."""
    peak = peak_tflops(device_kind)
    return None if peak is None else samples_per_second * flops_per_sample / (
        chips * peak * 1e12)
