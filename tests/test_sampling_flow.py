"""Flow-matching sampler: parity with the original loop, guidance algebra, compile caching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import shared_fixture
from test_sampling_pipeline import random_module
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.sampling import image_sampler as flow, sample_images


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def converted(tiny_transformer_dir):
    """The released-layout tiny transformer (converted once per session by conftest) and
    the original code's 8-step sampler outputs."""
    from safetensors.numpy import load_file

    from unialign_jax import load_transformer

    reference = load_file(shared_fixture("unialignment_tiny", "sampler_reference.safetensors"))
    return load_transformer(tiny_transformer_dir), reference


@pytest.fixture(scope="module")
def tiny():
    model = random_module(lambda: MMDiT(MMDiTConfig.tiny(), rngs=nnx.Rngs(0)), 0)
    keys = jax.random.split(jax.random.key(1), 4)
    latents = jax.random.normal(keys[0], (2, 8, 8, 16))
    context = jax.random.normal(keys[1], (2, 5, 32))
    negative = jax.random.normal(keys[2], (1, 5, 32))
    condition = jax.random.normal(keys[3], (2, 8, 8, 16))
    return model, latents, context, negative, condition


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_reproduces_the_original_8_step_cfg_loop(converted, task):
    model, ref = converted
    conditions = [nhwc(ref["edit_latents"])] if task == "edit" else []
    out = sample_images(model, nhwc(ref["init_latents"]), ref["cond_context"],
                        ref["uncond_context"], num_steps=8, guidance_scale=7.0, shift=3.0,
                        conditions=conditions)
    expected = nhwc(ref[f"{task}_final"])
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0,
                               atol=1e-4 * np.abs(expected).max())


def test_guidance_interpolates_the_two_halves(tiny):
    """g = 1 is the positive prompt alone and g = 0 the negative alone (v_neg + g·Δ)."""
    model, latents, context, negative, _ = tiny
    kw = dict(num_steps=3)
    pos = sample_images(model, latents, context, None, **kw)
    neg = sample_images(model, latents, jnp.broadcast_to(negative, context.shape), None, **kw)
    np.testing.assert_allclose(sample_images(model, latents, context, negative,
                                             guidance_scale=1.0, **kw), pos, atol=1e-5)
    np.testing.assert_allclose(sample_images(model, latents, context, negative,
                                             guidance_scale=0.0, **kw), neg, atol=1e-5)
    assert not np.allclose(pos, neg, atol=1e-3)


def test_single_step_is_one_euler_step_from_sigma_one(tiny):
    model, latents, context, _, condition = tiny
    out = sample_images(model, latents, context, None, num_steps=1, conditions=[condition])
    v = model(latents, jnp.full((2,), 1000.0), context, conditions=[condition]).sample
    np.testing.assert_allclose(out, latents - v, atol=1e-5)


def test_second_call_with_same_shapes_compiles_nothing(tiny):
    model, latents, context, negative, condition = tiny
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def run(guidance, shift, seed):
        x = jax.random.normal(jax.random.key(seed), latents.shape)
        return sample_images(model, x, context, negative, num_steps=4, guidance_scale=guidance,
                             shift=shift, conditions=[condition]).block_until_ready()

    run(7.0, 3.0, 0)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run(4.5, 2.0, 1)  # new values, same shapes: guidance and shift are traced, not static
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize("case, message", [
    ("latents_3d", "init_latents must be"),
    ("context_batch", "context must be"),
    ("negative_length", "negative_context shape"),
    ("condition_size", "condition 0 has shape"),
])
def test_bad_shapes_fail_before_tracing(tiny, case, message, monkeypatch):
    model, latents, context, negative, condition = tiny
    args = dict(init_latents=latents, context=context, negative_context=negative,
                conditions=[condition])
    if case == "latents_3d":
        args["init_latents"] = latents[0]
    elif case == "context_batch":
        args["context"] = context[:1]
    elif case == "negative_length":
        args["negative_context"] = negative[:, :3]
    else:
        args["conditions"] = [condition[:, :4]]
    monkeypatch.setattr(flow, "_euler_loop", None)  # reaching the loop would be a TypeError
    with pytest.raises(ValueError, match=message):
        sample_images(model, num_steps=2, **args)
