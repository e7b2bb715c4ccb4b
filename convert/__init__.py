"""Conversion of released PyTorch (diffusers / transformers) weights into unialign_jax checkpoints.

Only key mapping and I/O live here; the models themselves are in `unialign_jax.models`.
"""
