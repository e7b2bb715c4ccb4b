"""SD3 VAE: parity with diffusers' `AutoencoderKL`, latent shift/scale, chunking, bad input."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import unialign_jax  # noqa: E402
from unialign_convert import cli  # noqa: E402
from unialign_jax.checkpoints.io import CheckpointError  # noqa: E402

SHIFT, SCALE = 0.0609, 1.5305  # SD3's, spec section 2


def random_vae(path, *, quant_convs=False, seed=0):
    """A small 16-latent-channel diffusers AutoencoderKL, every weight random, saved at `path`.

    Three resolutions (two downsamplings) and widths 16→32 so shortcut convs are exercised.
    """
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), norm_num_groups=8, shift_factor=SHIFT,
        scaling_factor=SCALE, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    vae.save_pretrained(path)
    return vae


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    torch_vae = random_vae(root / "src")
    assert cli.main(["vae", str(root / "src"), str(root / "dst")]) == 0
    return torch_vae, unialign_jax.load_vae(str(root / "dst"))


def close(ours, ref):
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_posterior_matches_diffusers_on_non_square_images(converted):
    torch_vae, vae = converted
    images = np.random.RandomState(0).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = nnx.jit(lambda m, x: m.posterior(x))(vae, jnp.asarray(nhwc(images)))
    assert mean.shape == (2, 6, 10, 16)
    close(nchw(mean), dist.mean.numpy())
    close(nchw(logvar), dist.logvar.numpy())


def test_decode_matches_diffusers_after_unscaling(converted):
    """decode(z) is diffusers' decoder applied to z / scale + shift."""
    torch_vae, vae = converted
    latents = np.random.RandomState(1).randn(2, 16, 3, 5).astype(np.float32)
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(latents) / SCALE + SHIFT).sample.numpy()
    images = nnx.jit(lambda m, z: m.decode(z))(vae, jnp.asarray(nhwc(latents)))
    assert images.shape == (2, 12, 20, 3)
    close(nchw(images), ref)


def test_encode_draws_from_the_posterior_then_shifts_and_scales(converted):
    torch_vae, vae = converted
    images = np.random.RandomState(2).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(images)).latent_dist
    encode = nnx.jit(lambda m, x, k: m.encode(x, k))
    key = jax.random.key(7)
    latents = np.asarray(encode(vae, jnp.asarray(nhwc(images)), key))
    noise = np.asarray(jax.random.normal(key, latents.shape, jnp.float32))
    expected = (nhwc(dist.mean.numpy()) + nhwc(dist.std.numpy()) * noise - SHIFT) * SCALE
    close(latents, expected)
    other = np.asarray(encode(vae, jnp.asarray(nhwc(images)), jax.random.key(8)))
    assert np.abs(other - latents).max() > 1e-3, "encode must sample, not return the mean"


def test_latent_shift_scale_round_trip(converted):
    _, vae = converted
    sample = jnp.asarray(np.random.RandomState(3).randn(2, 4, 4, 16).astype(np.float32))
    np.testing.assert_allclose(vae.to_latents(jnp.full((1,), SHIFT + 1.0)), [SCALE], rtol=1e-6)
    np.testing.assert_allclose(vae.from_latents(vae.to_latents(sample)), sample, rtol=0, atol=1e-6)
    np.testing.assert_allclose(vae.to_latents(vae.from_latents(sample)), sample, rtol=0, atol=1e-6)


def test_chunked_decoding_equals_whole_batch(converted):
    _, vae = converted
    latents = jnp.asarray(np.random.RandomState(4).randn(3, 2, 3, 16).astype(np.float32))
    whole = nnx.jit(lambda m, z: m.decode(z))(vae, latents)
    chunked = nnx.jit(lambda m, z: m.decode(z, images_per_chunk=2))(vae, latents)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)


def test_parameters_carry_logical_axes(converted):
    _, vae = converted
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
    conv = vae.decoder.up_blocks[0].resnets[0].conv1
    assert conv.kernel.get_metadata()["out_sharding"] == (None, None, "conv_in", "conv_out")


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


BAD_SOURCES = {
    "wrong_class": (lambda src: _edit_config(src, _class_name="UNet2DConditionModel"),
                    "expected an AutoencoderKL, found 'UNet2DConditionModel'"),
    "quant_convs": (lambda src: _edit_config(src, use_quant_conv=True),
                    r"differs in \['use_quant_conv'\]"),
    "wrong_width": (lambda src: _edit_config(src, block_out_channels=[16, 32, 48]),
                    r"shape mismatches: .*decoder\.conv_in\.weight \(32, 16, 3, 3\) "
                    r"\(expected \(48, 16, 3, 3\)\)"),
    "missing_tensor": (lambda src: _drop_tensor(src, "encoder.mid_block.attentions.0.to_k.bias"),
                       r"missing tensors: encoder\.mid_block\.attentions\.0\.to_k\.bias"),
    "corrupt": (lambda src: (src / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64),
                "corrupt safetensors header"),
}


def _drop_tensor(src, key):
    from safetensors.numpy import load_file, save_file

    path = src / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path)


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_refused_and_nothing_is_written(tmp_path, capsys, case):
    damage, message = BAD_SOURCES[case]
    random_vae(tmp_path / "src")
    damage(tmp_path / "src")
    assert cli.main(["vae", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == ["src"], "nothing may be left at or beside DST"


def test_loading_another_kind_of_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "unialign_jax.t5"}))
    with pytest.raises(CheckpointError, match="not a unialign_jax.vae checkpoint"):
        unialign_jax.load_vae(str(tmp_path))
