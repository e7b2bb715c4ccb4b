"""Every UniAlignment loss term against an independent NumPy computation (spec section 4)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from unialign_jax.training import losses

RNG = np.random.default_rng(0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logit_normal_sigmas_match_the_discrete_training_grid():
    u = RNG.normal(size=64).astype(np.float32)
    # diffusers: indices = (sigmoid(u) * 1000).long(); sigmas = linspace(1, 1/1000, 1000)
    grid = np.linspace(1.0, 1.0 / 1000, 1000)
    expected = grid[(1.0 / (1.0 + np.exp(-u.astype(np.float64))) * 1000).astype(np.int64)]
    got = np.asarray(losses.logit_normal_sigmas(jnp.asarray(u)))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.min() > 0.0 and got.max() <= 1.0


def test_flow_matching_loss():
    x = RNG.normal(size=(3, 4, 4, 2)).astype(np.float32)
    eps = RNG.normal(size=x.shape).astype(np.float32)
    v = RNG.normal(size=x.shape).astype(np.float32)
    sigma = np.array([0.1, 0.5, 0.97], np.float32)
    s = sigma[:, None, None, None]
    noisy = (1 - s) * x + s * eps
    per_sample = [np.mean((noisy[i] - sigma[i] * v[i] - x[i]) ** 2) for i in range(3)]
    got_noisy = losses.noise_latents(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(sigma))
    np.testing.assert_allclose(np.asarray(got_noisy), noisy, rtol=1e-6, atol=1e-6)
    got = losses.flow_matching_loss(jnp.asarray(x), got_noisy, jnp.asarray(sigma), jnp.asarray(v))
    np.testing.assert_allclose(float(got), np.mean(per_sample), rtol=1e-5)
    # The exact velocity (ε − x) gives zero loss.
    assert float(losses.flow_matching_loss(jnp.asarray(x), got_noisy, jnp.asarray(sigma),
                                           jnp.asarray(eps - x))) < 1e-10


def test_antithetic_times_cover_one_stratum_each():
    b, eps = 8, 1e-3
    u = RNG.uniform(size=b).astype(np.float32)
    expected = [(1 - eps) * ((u[j] / b + j / b) % 1.0) + eps for j in range(b)]
    got = np.asarray(losses.antithetic_times(jnp.asarray(u), eps))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    strata = np.floor((got - eps) / (1 - eps) * b)
    assert sorted(strata.tolist()) == list(range(b))


def test_mask_tokens_uses_probability_one_minus_eps_times_t():
    ids = RNG.integers(0, 50, size=(2, 10)).astype(np.int32)
    t = np.array([0.3, 0.9], np.float32)
    u = RNG.uniform(size=(2, 10)).astype(np.float32)
    expected = ids.copy()
    for i in range(2):
        for j in range(10):
            if u[i, j] < (1 - 1e-3) * t[i]:
                expected[i, j] = 99
    got = losses.mask_tokens(jnp.asarray(ids), jnp.asarray(t), jnp.asarray(u), 99)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_caption_loss_is_subs_weighted_by_one_over_t():
    b, length, vocab, mask_id = 3, 6, 11, 10
    clean = RNG.integers(0, mask_id, size=(b, length)).astype(np.int32)
    noisy = np.where(RNG.uniform(size=(b, length)) < 0.5, mask_id, clean).astype(np.int32)
    noisy[0, 0], noisy[1, 1] = mask_id, clean[1, 1]  # at least one of each kind
    logits = RNG.normal(size=(b, length, vocab)).astype(np.float32) * 3
    t = np.array([0.2, 0.6, 0.95], np.float32)

    total = 0.0
    for i in range(b):
        for j in range(length):
            if noisy[i, j] == mask_id:
                lg = logits[i, j].astype(np.float64).copy()
                lg[mask_id] += -1e6
                total += -_log_softmax(lg)[clean[i, j]] / t[i]
            # unmasked: SUBS puts probability 1 on the observed (= clean) id → 0 loss
    expected = total / (b * length)
    got = losses.caption_loss(jnp.asarray(logits), jnp.asarray(clean), jnp.asarray(noisy),
                              jnp.asarray(t), mask_id)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


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


def test_total_weights_from_config_follow_the_spec():
    from unialign_jax.training.config import TrainConfig
    from unialign_jax.training.objective import LossWeights

    w = LossWeights.from_config(TrainConfig())
    assert (w.image, w.caption, w.contrastive, w.align) == (1.0, 0.2, 0.05, 0.1)
    assert (w.block_depth, w.null_prompt_prob, w.temperature, w.caption_eps) == (8, 0.1, 0.07,
                                                                                  1e-3)


@pytest.mark.parametrize("drop_all", [True, False])
def test_null_prompt_dropout_and_total_loss(drop_all):
    """The objective on tiny stand-in models: total = weighted sum of the reported terms,
    and with null_prompt_prob=1 the image pass sees only the null prompt's context."""
    from flax import nnx
    from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
    from unialign_jax.training.objective import LossWeights, unialign_loss

    model = MMDiT(MMDiTConfig.tiny(), rngs=nnx.Rngs(0))
    seen = []

    class T5:
        def __call__(self, ids):
            return jnp.broadcast_to(ids[..., None].astype(jnp.float32) / 10, ids.shape + (32,))

    class VAE:
        def encode(self, x, key, images_per_chunk=None):
            return x[:, ::2, ::2, :1].repeat(16, -1)

    class Spy:
        def __call__(self, latents, timestep, context, **kw):
            seen.append(context)
            return model(latents, timestep, context, **kw)

    b = 4
    batch = {"target": jnp.asarray(RNG.uniform(-1, 1, (b, 16, 16, 3)), jnp.float32),
             "caption_ids": jnp.asarray(RNG.integers(0, 60, (b, 8)), jnp.int32),
             "instruction_ids": jnp.asarray(RNG.integers(2, 60, (b, 8)), jnp.int32),
             "teacher_image": jnp.asarray(RNG.normal(size=(b, 40)), jnp.float32),
             "teacher_text": jnp.asarray(RNG.normal(size=(b, 40)), jnp.float32)}
    null = jnp.full((1, 8, 32), -7.0)
    w = LossWeights(block_depth=1, null_prompt_prob=1.0 if drop_all else 0.0)
    total, terms = unialign_loss(Spy(), T5(), VAE(), batch, null, jax.random.key(0), w, 63)
    image_context = np.asarray(seen[0])
    assert np.all(image_context == -7.0) == drop_all
    if not drop_all:
        np.testing.assert_allclose(image_context[..., 0],
                                   np.asarray(batch["instruction_ids"]) / 10, rtol=1e-6)
    expected = (terms["loss_image"] + 0.2 * terms["loss_caption"]
                + 0.05 * terms["loss_contrastive"]
                + 0.1 * (terms["loss_align_text"] + terms["loss_align_image"]))
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(terms["loss_align_text"]) > 0 and float(terms["loss_align_image"]) > 0
