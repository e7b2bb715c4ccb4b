"""Samplers and the notebook / command-line front ends (spec section 5).

`sample_images` (flow matching with classifier-free guidance) and `sample_caption`
(masked discrete diffusion) are the low-level jitted loops; `UniAlignPipeline` wraps them
with text encoding, image pre/post-processing and the VAE.
"""

from unialign_jax.sampling.caption import CaptionSample, sample_caption
from unialign_jax.sampling.flow import sample_images
from unialign_jax.sampling.schedule import caption_times, flow_sigmas

__all__ = ["CaptionSample", "caption_times", "flow_sigmas", "sample_caption", "sample_images"]
