"""Parity with diffusers' `SD3Transformer2DModel` (torch, random weights), through the CLI
converter `unialign-convert transformer` and `load_transformer`."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import unialign_jax  # noqa: E402
from unialign_convert.cli import main as convert_main  # noqa: E402

RTOL = 1e-4  # max |ours - torch| / max |torch| in float32

CONFIGS = {
    # square latent, 3 blocks (2 scanned + the context-pre-only last one)
    "square": (dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3,
                    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=24,
                    caption_projection_dim=32, pooled_projection_dim=12, out_channels=16,
                    pos_embed_max_size=16), (16, 16)),
    # non-square latent, other widths, a single scanned block
    "rect": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=20,
                  caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
                  pos_embed_max_size=12), (6, 10)),
}


def _random_sd3(config: dict, seed: int):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():  # no zero-initialised tensor may hide a mapping error
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sd3_forward_matches_diffusers(tmp_path, name):
    config, (h, w) = CONFIGS[name]
    torch_model = _random_sd3(config, seed=len(name))
    torch_model.save_pretrained(tmp_path / "src")
    assert convert_main(["transformer", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    model = unialign_jax.load_transformer(str(tmp_path / "dst"))

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, config["in_channels"], h, w), dtype=np.float32)
    context = rng.standard_normal((2, 7, config["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32)
    timestep = np.array([999.0, 37.5], np.float32)
    with torch.no_grad():
        expected = torch_model(hidden_states=torch.from_numpy(latents),
                               encoder_hidden_states=torch.from_numpy(context),
                               pooled_projections=torch.from_numpy(pooled),
                               timestep=torch.from_numpy(timestep)).sample.numpy()
    ours = model(jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
                 jnp.asarray(context), pooled=jnp.asarray(pooled)).sample
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert ours.shape == expected.shape
    err = np.abs(ours - expected).max() / np.abs(expected).max()
    assert err <= RTOL, f"relative error {err:.2e}"
