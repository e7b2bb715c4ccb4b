"""The two diffusion processes' sampling schedules against their definitions (diffusers'
scheduler, spec 5)."""

import numpy as np
import pytest

from unialign_jax.diffusion.flow import inference_sigmas as flow_sigmas
from unialign_jax.diffusion.masked import sampler_times as caption_times


@pytest.mark.parametrize("num_steps", [1, 8, 28, 50])
def test_flow_sigmas_match_diffusers_scheduler(num_steps):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(num_steps)
    sigmas = flow_sigmas(num_steps, shift=3.0)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(1000 * sigmas[:-1], ref.timesteps.numpy(), rtol=0, atol=1e-3)


def test_flow_sigmas_shift_the_end_point_twice():
    """Spec 5: for 8 steps the last nonzero sigma is 0.00893 (shifted twice), not 0.00299."""
    sigmas = flow_sigmas(8, shift=3.0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[-2], 0.008928571, atol=1e-7)
    assert np.all(np.diff(sigmas) < 0)


def test_flow_sigmas_shift_one_is_the_plain_linear_grid():
    np.testing.assert_allclose(flow_sigmas(4, shift=1.0)[:-1], np.linspace(1, 1e-3, 4), atol=1e-7)


def test_caption_times_are_linspace_to_eps():
    times = caption_times(4)
    np.testing.assert_allclose(times, [1.0, 0.7500025, 0.500005, 0.2500075, 1e-5], atol=1e-7)


@pytest.mark.parametrize("bad", [0, -3])
def test_schedules_reject_no_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(bad)
    with pytest.raises(ValueError, match="num_steps"):
        caption_times(bad)
