"""The representation losses against independent NumPy computations (spec section 4), and
the objective's wiring: which pass feeds which loss, null-prompt dropout, the weighted total.
The whole objective against the release's own values is tests/test_objective_reference.py."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from unialign_jax.diffusion import alignment_losses as losses

RNG = np.random.default_rng(0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_contrastive_loss_symmetric_infonce():
    img = RNG.normal(size=(4, 5, 8)).astype(np.float32)
    txt = RNG.normal(size=(4, 7, 8)).astype(np.float32)
    a = img.mean(1)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    c = txt.mean(1)
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    logits = a @ c.T / 0.07
    i2t = -np.mean([_log_softmax(logits[k])[k] for k in range(4)])
    t2i = -np.mean([_log_softmax(logits[:, k])[k] for k in range(4)])
    got = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 0.07)
    np.testing.assert_allclose(float(got), (i2t + t2i) / 2, rtol=1e-5)


def test_cosine_alignment_loss():
    a = RNG.normal(size=(5, 9)).astype(np.float32)
    b = RNG.normal(size=(5, 9)).astype(np.float32)
    cos = [a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in range(5)]
    got = losses.cosine_alignment_loss(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(float(got), 1 - np.mean(cos), rtol=1e-5)
    assert abs(float(losses.cosine_alignment_loss(jnp.asarray(a), jnp.asarray(3 * a)))) < 1e-6


def test_contrastive_loss_in_groups_is_the_mean_of_each_groups_loss():
    img = RNG.normal(size=(8, 5, 8)).astype(np.float32)
    txt = RNG.normal(size=(8, 7, 8)).astype(np.float32)
    per_group = [float(losses.contrastive_loss(jnp.asarray(img[g * 2:(g + 1) * 2]),
                                               jnp.asarray(txt[g * 2:(g + 1) * 2])))
                 for g in range(4)]
    got = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), groups=4)
    np.testing.assert_allclose(float(got), np.mean(per_group), rtol=1e-6)
    assert abs(float(got) - float(losses.contrastive_loss(jnp.asarray(img),
                                                          jnp.asarray(txt)))) > 1e-3


def test_loss_config_defaults_follow_the_spec():
    from unialign_jax.runs.config import LossConfig

    w = LossConfig()
    assert (w.image_weight, w.caption_weight, w.contrastive_weight, w.align_weight) == \
        (1.0, 0.2, 0.05, 0.1)
    assert (w.block_depth, w.null_prompt_prob, w.contrastive_temperature, w.caption_eps) == \
        (8, 0.1, 0.07, 1e-3)
    assert w.contrastive_scope == "device"
    assert (w.logit_mean, w.logit_std) == (0.0, 1.0)


@pytest.mark.parametrize("drop_all", [True, False])
def test_null_prompt_dropout_and_which_pass_feeds_which_loss(drop_all):
    """The objective on a tiny model with stand-in T5 / VAE: with null_prompt_prob=1 the image
    pass sees only the null prompt's context; the image pass gets the noisy target at its
    timestep (σ from the configured logit-normal), the caption pass the other posterior
    sample at timestep 0 and the masked caption; each loss term equals its function
    applied to the right pass's outputs."""
    from flax import nnx
    from unialign_jax.diffusion import flow, masked
    from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
    from unialign_jax.training import objective
    from unialign_jax.runs.config import LossConfig

    model = MMDiT(MMDiTConfig.tiny(), rngs=nnx.Rngs(0))
    calls = []

    def t5(ids):
        return jnp.broadcast_to(ids[..., None].astype(jnp.float32) / 10, ids.shape + (32,))

    class VAE:
        def posterior(self, x, images_per_chunk=None):
            mean = x[:, ::2, ::2, :1].repeat(16, -1)
            return mean, jnp.full_like(mean, -2.0)

        def sample_latents(self, mean, logvar, key):
            return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)

    def spy(latents, timestep, context, **kw):
        out = model(latents, timestep, context, **kw)
        calls.append(dict(latents=latents, timestep=timestep, context=context, out=out, **kw))
        return out

    b = 4
    batch = {"target": jnp.asarray(RNG.uniform(-1, 1, (b, 16, 16, 3)), jnp.float32),
             "caption_ids": jnp.asarray(RNG.integers(0, 60, (b, 8)), jnp.int32),
             "instruction_ids": jnp.asarray(RNG.integers(2, 60, (b, 8)), jnp.int32),
             "teacher_image": jnp.asarray(RNG.normal(size=(b, 40)), jnp.float32),
             "teacher_text": jnp.asarray(RNG.normal(size=(b, 40)), jnp.float32)}
    null = jnp.full((1, 8, 32), -7.0)
    # One case with the release's timestep law, one with a shifted, narrower logit-normal.
    logit = (0.0, 1.0) if drop_all else (0.7, 0.5)
    cfg = LossConfig(block_depth=1, null_prompt_prob=1.0 if drop_all else 0.0,
                     logit_mean=logit[0], logit_std=logit[1])
    key = jax.random.key(0)
    total, terms = objective.micro_batch_loss(spy, t5, VAE(), batch, null, key, cfg, 63)
    image, caption = calls
    assert np.all(np.asarray(image["context"]) == -7.0) == drop_all
    if not drop_all:
        np.testing.assert_allclose(np.asarray(image["context"])[..., 0],
                                   np.asarray(batch["instruction_ids"]) / 10, rtol=1e-6)
    # Replay the draws: the image pass got x_σ at 1000 − index, the caption pass timestep 0.
    k_vae, k_draws = jax.random.split(key)
    draws = objective.Draws.sample(k_draws, image["latents"].shape, 8)
    latents, caption_latents, _ = objective.encode_images(VAE(), batch, k_vae)
    sigma, timesteps = flow.training_timesteps(logit[0] + logit[1] * draws.flow_logit_normal)
    np.testing.assert_allclose(np.asarray(image["latents"]),
                               np.asarray(flow.add_noise(latents, draws.flow_noise, sigma)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image["timestep"]), np.asarray(timesteps))
    np.testing.assert_array_equal(np.asarray(caption["timestep"]), 0.0)
    # t2i: the caption pass encodes its own posterior sample of the same target.
    np.testing.assert_array_equal(np.asarray(caption["latents"]), np.asarray(caption_latents))
    assert np.abs(np.asarray(caption_latents) - np.asarray(latents)).max() > 1e-3
    times = masked.antithetic_times(draws.caption_time_uniform)
    noisy_ids = masked.mask_tokens(batch["caption_ids"], times, draws.caption_mask_uniform, 63)
    np.testing.assert_allclose(np.asarray(caption["context"])[..., 0],
                               np.asarray(noisy_ids) / 10, rtol=1e-6)
    # Each term from the right pass.
    np.testing.assert_allclose(float(terms["loss_image"]), float(flow.loss(
        latents, image["latents"], sigma, image["out"].sample)), rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss_caption"]), float(masked.loss(
        caption["out"].text_logits, batch["caption_ids"], noisy_ids, times, 63)), rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss_contrastive"]), float(losses.contrastive_loss(
        image["out"].image_hidden, caption["out"].text_hidden)), rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss_align_text"]), float(
        losses.cosine_alignment_loss(caption["out"].mid_text_proj, batch["teacher_text"])),
        rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss_align_image"]), float(
        losses.cosine_alignment_loss(image["out"].mid_image_proj, batch["teacher_image"])),
        rtol=1e-6)
    expected = (terms["loss_image"] + 0.2 * terms["loss_caption"]
                + 0.05 * terms["loss_contrastive"]
                + 0.1 * (terms["loss_align_text"] + terms["loss_align_image"]))
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
