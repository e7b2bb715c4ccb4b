"""Fits a small `AutoencoderKL` to a set of images, for from-scratch toy runs.

A randomly initialised frozen VAE would make generated latents undecodable (its decoder
is not the encoder's inverse), so colour could never be scored. The quickstart therefore
fits a tiny VAE first (reconstruction + a light KL term), then sets its latent shift and
scale to the mean and inverse standard deviation of the posterior samples, as SD3's
`shift_factor` / `scaling_factor` do, and writes it as a converted VAE folder
(`unialign_jax.load_vae` reads it); training then keeps it frozen like SD3's VAE.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unialign_jax.checkpoints import registry
from unialign_jax.models.vae import AutoencoderKL, VAEConfig


def fit_vae(images: np.ndarray, config: VAEConfig, *, steps: int = 400, batch_size: int = 32,
            lr: float = 2e-3, kl_weight: float = 1e-4, seed: int = 0, progress=None
            ) -> tuple[AutoencoderKL, dict]:
    """Trains on `images` ((N, H, W, 3) in [-1, 1]); returns the VAE with its latent
    statistics folded into the config, and {'mse': final reconstruction error}."""
    vae = AutoencoderKL(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(vae)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, key):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.posterior(x, images_per_chunk=x.shape[0])
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = model.decoder(z)
        mse = jnp.mean(jnp.square(recon - x))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return mse + kl_weight * kl, mse

    @jax.jit
    def step(params, opt_state, x, key):
        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    mse = float("nan")
    for i in range(steps):
        batch = jnp.asarray(images[rng.integers(0, len(images), batch_size)])
        params, opt_state, mse = step(params, opt_state, batch, jax.random.fold_in(key, i))
        if progress is not None:
            progress(i + 1, steps)
    vae = nnx.merge(graphdef, params)
    mean, logvar = jax.jit(lambda x: vae.posterior(x, images_per_chunk=x.shape[0]))(
        jnp.asarray(images[:256]))
    samples = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    fitted = dataclasses.replace(config, shift_factor=float(samples.mean()),
                                 scaling_factor=float(1.0 / samples.std()))
    vae.config = fitted
    return vae, {"mse": float(mse), "shift_factor": fitted.shift_factor,
                 "scaling_factor": fitted.scaling_factor}


def save_vae(vae: AutoencoderKL, folder: str, force: bool = False) -> None:
    """Writes a converted-VAE folder (config.json + Orbax parameters), atomically."""
    registry.save_model("vae", vae, folder, "float32", force=force)
