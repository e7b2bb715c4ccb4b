"""Parity with the original PyTorch UniAlignment transformer (../shared/fixtures/unialignment_tiny).

The fixture holds the released layout with random weights and the original model's float32
outputs for every task; our model must reproduce them through `unialign-convert transformer`
and `load_transformer`.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import unialign_jax
from conftest import shared_fixture

OUTPUTS = ("sample", "text_logits", "image_hidden", "text_hidden", "mid_image_proj",
           "mid_text_proj")
FP32_RTOL = 1e-4   # max |ours - torch| / max |torch|, the bound
BF16_RTOL = 3e-2   # bf16 compute through 4 blocks; measured worst case 1.5e-2


@pytest.fixture(scope="module")
def reference():
    ref = load_file(shared_fixture("unialignment_tiny", "reference_io.safetensors"))
    with open(shared_fixture("unialignment_tiny", "reference_io.json")) as f:
        meta = json.load(f)
    return ref, meta


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _inputs(ref, case):
    """(latents, timestep, context, conditions) of a fixture case, channels-last."""
    latents = {"gen": "latents", "edit": "latents", "compose": "latents",
               "gen_rect": "latents_rect", "text_only": None}[case]
    conditions = {"edit": ["edit_latents"], "compose": ["compose_1", "compose_2", "compose_3"]
                  }.get(case, [])
    batch = ref[f"{case}.text_logits"].shape[0]
    timestep = np.zeros(batch, np.float32) if case == "text_only" else ref["timestep"][:batch]
    return (None if latents is None else _nhwc(ref[latents]), jnp.asarray(timestep),
            jnp.asarray(ref["context"][:batch]), [_nhwc(ref[c]) for c in conditions])


def _run(model, ref, meta, case):
    latents, timestep, context, conditions = _inputs(ref, case)
    out = model(latents, timestep, context, conditions=conditions,
                block_depth=meta["block_depth"])
    result = {}
    for name in OUTPUTS:
        value = np.asarray(getattr(out, name), np.float32)
        if name == "sample" and latents is not None:
            value = value.transpose(0, 3, 1, 2)  # back to the fixture's NCHW
        result[name] = value
    return result


@pytest.fixture(scope="module")
def model_fp32(tiny_transformer_dir):
    return unialign_jax.load_transformer(tiny_transformer_dir)


@pytest.mark.parametrize("case", ["gen", "gen_rect", "edit", "compose", "text_only"])
def test_matches_pytorch_reference(model_fp32, reference, case):
    ref, meta = reference
    assert case in meta["cases"]
    ours = _run(model_fp32, ref, meta, case)
    for name in meta["outputs"]:
        expected = ref[f"{case}.{name}"]
        assert ours[name].shape == expected.shape, name
        err = np.abs(ours[name] - expected).max() / np.abs(expected).max()
        assert err <= FP32_RTOL, f"{case}.{name}: relative error {err:.2e}"


def test_mid_features_absent_without_block_depth(model_fp32, reference):
    ref, _ = reference
    latents, timestep, context, _ = _inputs(ref, "gen")
    out = model_fp32(latents, timestep, context)
    assert out.mid_image_proj is None and out.mid_text_proj is None
    np.testing.assert_allclose(np.asarray(out.sample).transpose(0, 3, 1, 2), ref["gen.sample"],
                               atol=FP32_RTOL * np.abs(ref["gen.sample"]).max())


def test_block_depth_selects_that_block(model_fp32, reference):
    """The mid features must come from block `block_depth`, not a neighbour."""
    ref, meta = reference
    latents, timestep, context, _ = _inputs(ref, "gen")
    other = model_fp32(latents, timestep, context, block_depth=meta["block_depth"] + 1)
    assert np.abs(np.asarray(other.mid_image_proj) - ref["gen.mid_image_proj"]).max() > 1e-3


@pytest.mark.parametrize("case", ["gen", "edit", "text_only"])
def test_bf16_compute_close_to_float32(tiny_transformer_dir, reference, case):
    ref, meta = reference
    model = unialign_jax.load_transformer(tiny_transformer_dir, dtype=jnp.bfloat16)
    assert model.blocks.attn.to_q.kernel.dtype == jnp.float32  # fp32 parameters kept
    ours = _run(model, ref, meta, case)
    for name in meta["outputs"]:
        expected = ref[f"{case}.{name}"]
        err = np.abs(ours[name] - expected).max() / np.abs(expected).max()
        assert err <= BF16_RTOL, f"{case}.{name}: bf16 relative error {err:.2e}"
