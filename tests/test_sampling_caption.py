"""Masked-diffusion caption sampler on synthetic denoisers (spec section 5, captions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.diffusion.masked import NEG_INF, subs_log_probs, unmask_step
from unialign_jax.sampling.caption import sample_caption

VOCAB, MASK, LENGTH = 12, 11, 10


def uniform_denoiser(params, ids):
    return jnp.zeros(ids.shape + (VOCAB,), jnp.float32)


def oracle_denoiser(target, ids):
    """All probability on `target` (its params), whatever the input."""
    return 1e4 * jax.nn.one_hot(target, VOCAB)


def context_denoiser(params, ids):
    """Logits that depend on the whole current sequence, so stale probabilities would show."""
    seen = jax.nn.one_hot(ids, VOCAB).sum(1, keepdims=True)           # (B, 1, V)
    pos = jnp.arange(ids.shape[1])[None, :, None] * params             # (1, L, 1)
    return jnp.sin(seen * 1.3 + pos + jnp.arange(VOCAB))


def masked_prompt(batch, prompt=(3, 5, 7)):
    ids = np.full((batch, LENGTH), MASK, np.int32)
    ids[:, :len(prompt)] = prompt
    return ids


def test_subs_log_probs_matches_its_definition():
    logits = jax.random.normal(jax.random.key(0), (2, 4, VOCAB))
    ids = np.array([[MASK, 2, MASK, 9], [0, MASK, MASK, MASK]], np.int32)
    got = np.asarray(subs_log_probs(logits, ids, MASK))
    want = np.asarray(logits, np.float64).copy()
    want[..., MASK] += NEG_INF
    top = want.max(-1, keepdims=True)
    want = want - top - np.log(np.exp(want - top).sum(-1, keepdims=True))
    for b, i in zip(*np.nonzero(ids != MASK)):
        want[b, i] = NEG_INF
        want[b, i, ids[b, i]] = 0.0
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.exp(got[..., MASK]) == 0)


def test_unmask_step_draws_proportionally_and_keeps_masks_with_probability_s_over_t():
    n = 20000
    probs = np.zeros((1, n, VOCAB), np.float32)
    probs[..., :3] = [0.6, 0.3, 0.1]
    ids = np.full((1, n), MASK, np.int32)
    ids[0, :100] = 4  # already unmasked: must stay
    out = np.asarray(unmask_step(jax.random.key(1)[None], jnp.asarray(ids), jnp.asarray(probs),
                                 jnp.float32(0.8), jnp.float32(0.2), MASK))[0]
    assert np.all(out[:100] == 4)
    drawn = out[100:]
    freq = np.bincount(drawn, minlength=VOCAB) / drawn.size
    # Weights: p·(t − s) = p·0.6 on real ids, s = 0.2 on the mask; total t = 0.8.
    np.testing.assert_allclose(freq[:3], np.array([0.6, 0.3, 0.1]) * 0.6 / 0.8, atol=0.015)
    np.testing.assert_allclose(freq[MASK], 0.2 / 0.8, atol=0.015)
    assert freq[3:MASK].sum() == 0


def test_no_mask_left_and_prompt_tokens_unchanged():
    ids = masked_prompt(3)
    out = sample_caption(uniform_denoiser, None, ids, jax.random.key(0), mask_id=MASK,
                         num_steps=4).ids
    out = np.asarray(out)
    assert out.shape == (3, LENGTH)
    assert not np.any(out == MASK)
    np.testing.assert_array_equal(out[:, :3], ids[:, :3])


def test_denoiser_certain_of_a_sequence_yields_exactly_it():
    target = np.array([[1, 4, 2, 8, 5, 7, 0, 3, 9, 6], [6, 6, 1, 0, 2, 2, 9, 4, 4, 1]], np.int32)
    out = sample_caption(oracle_denoiser, jnp.asarray(target), np.full_like(target, MASK),
                         jax.random.key(3), mask_id=MASK, num_steps=8).ids
    np.testing.assert_array_equal(np.asarray(out), target)


def test_same_key_same_text_different_keys_different_draws():
    ids = masked_prompt(2)

    def run(seed):
        return np.asarray(sample_caption(uniform_denoiser, None, ids, jax.random.key(seed),
                                         mask_id=MASK, num_steps=8).ids)

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    a = run(0)
    assert not np.array_equal(a[0], a[1]), "batch elements must draw independently"


def test_per_sequence_keys_make_each_result_independent_of_the_batch():
    ids = masked_prompt(3)
    keys = jax.random.split(jax.random.key(9), 3)
    together = sample_caption(uniform_denoiser, None, ids, keys, mask_id=MASK, num_steps=6).ids
    alone = sample_caption(uniform_denoiser, None, ids[1:2], keys[1:2], mask_id=MASK,
                           num_steps=6).ids
    np.testing.assert_array_equal(np.asarray(together)[1:2], np.asarray(alone))


def test_reusing_probabilities_gives_the_same_samples_with_fewer_forwards():
    ids = masked_prompt(2, prompt=(3,))
    params = jnp.float32(0.7)
    steps = 32
    reused = sample_caption(context_denoiser, params, ids, jax.random.key(5), mask_id=MASK,
                            num_steps=steps, reuse_probs=True)
    fresh = sample_caption(context_denoiser, params, ids, jax.random.key(5), mask_id=MASK,
                           num_steps=steps, reuse_probs=False)
    np.testing.assert_array_equal(np.asarray(reused.ids), np.asarray(fresh.ids))
    assert int(fresh.num_forwards) == steps + 1
    # 9 masked positions over 32 steps: many steps change nothing and reuse the last p.
    assert int(reused.num_forwards) < steps + 1


def test_rejects_ids_that_are_not_a_batch_of_sequences():
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        sample_caption(uniform_denoiser, None, np.zeros(5, np.int32), jax.random.key(0),
                       mask_id=MASK)
