"""Samplers and the notebook / command-line front ends (spec section 5).

`sample_images` (flow matching with classifier-free guidance) and `sample_caption`
(masked discrete diffusion) are the low-level jitted loops over `unialign_jax.diffusion`;
`UniAlignPipeline` wraps them with text encoding, image pre/post-processing and the VAE.
"""

from unialign_jax.sampling.caption import CaptionSample, sample_caption
from unialign_jax.sampling.image_sampler import sample_images

__all__ = ["CaptionSample", "sample_caption", "sample_images"]
