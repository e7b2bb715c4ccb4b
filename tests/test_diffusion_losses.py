"""The two diffusion processes' training math against independent NumPy computations
(spec section 4): logit-normal timesteps, noising and the flow loss; antithetic times,
masking and the SUBS-weighted caption loss."""

import numpy as np

import jax.numpy as jnp

from unialign_jax.diffusion import flow, masked

RNG = np.random.default_rng(0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logit_normal_sigmas_match_the_discrete_training_grid():
    u = RNG.normal(size=64).astype(np.float32)
    # diffusers: indices = (sigmoid(u) * 1000).long(); sigmas = linspace(1, 1/1000, 1000)
    grid = np.linspace(1.0, 1.0 / 1000, 1000)
    expected = grid[(1.0 / (1.0 + np.exp(-u.astype(np.float64))) * 1000).astype(np.int64)]
    got, timesteps = flow.training_timesteps(jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
    assert float(got.min()) > 0.0 and float(got.max()) <= 1.0
    # The model is fed diffusers' integer training timesteps, 1000 − index.
    index = (1.0 / (1.0 + np.exp(-u.astype(np.float64))) * 1000).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(timesteps), 1000 - index)


def test_flow_matching_loss():
    x = RNG.normal(size=(3, 4, 4, 2)).astype(np.float32)
    eps = RNG.normal(size=x.shape).astype(np.float32)
    v = RNG.normal(size=x.shape).astype(np.float32)
    sigma = np.array([0.1, 0.5, 0.97], np.float32)
    s = sigma[:, None, None, None]
    noisy = (1 - s) * x + s * eps
    per_sample = [np.mean((noisy[i] - sigma[i] * v[i] - x[i]) ** 2) for i in range(3)]
    got_noisy = flow.add_noise(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(sigma))
    np.testing.assert_allclose(np.asarray(got_noisy), noisy, rtol=1e-6, atol=1e-6)
    got = flow.loss(jnp.asarray(x), got_noisy, jnp.asarray(sigma), jnp.asarray(v))
    np.testing.assert_allclose(float(got), np.mean(per_sample), rtol=1e-5)
    # The exact velocity (ε − x) gives zero loss.
    assert float(flow.loss(jnp.asarray(x), got_noisy, jnp.asarray(sigma),
                                           jnp.asarray(eps - x))) < 1e-10


def test_antithetic_times_cover_one_stratum_each():
    b, eps = 8, 1e-3
    u = RNG.uniform(size=b).astype(np.float32)
    expected = [(1 - eps) * ((u[j] / b + j / b) % 1.0) + eps for j in range(b)]
    got = np.asarray(masked.antithetic_times(jnp.asarray(u), eps))
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
    got = masked.mask_tokens(jnp.asarray(ids), jnp.asarray(t), jnp.asarray(u), 99)
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
    got = masked.loss(jnp.asarray(logits), jnp.asarray(clean), jnp.asarray(noisy),
                              jnp.asarray(t), mask_id)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
