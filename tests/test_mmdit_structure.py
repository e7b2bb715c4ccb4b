"""Structure of the MMDiT: the full-size layout, sharding annotations, scan over layers,
rematerialisation and the fixed position table."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import shared_fixture
from unialign_convert.transformer_keys import abstract_params, torch_shapes
from unialign_jax.models import embeddings
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig


def test_key_mapping_covers_full_size_layout_exactly():
    """Every key and shape of the released 2.18B model, from abstract shapes only."""
    with open(shared_fixture("unialignment_full_shapes.json")) as f:
        full = json.load(f)
    config = MMDiTConfig.from_diffusers({"_class_name": "SD3JointModelFlexible",
                                         **full["config"]})
    ours = torch_shapes(config)
    expected = {k: tuple(v) for k, v in full["shapes"].items()}
    assert set(ours) - set(expected) == set(), "keys we would require that the release lacks"
    assert set(expected) - set(ours) == set(), "release keys we would not convert"
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    n_params = sum(int(np.prod(s)) for s in jax.tree.leaves(
        jax.tree.map(lambda a: a.shape, abstract_params(config)), is_leaf=lambda x: isinstance(x, tuple)))
    assert n_params == full["num_params"] == 2_180_461_988


@pytest.mark.parametrize("variant", ["unialignment", "sd3"])
def test_every_parameter_has_logical_axes(variant):
    config = MMDiTConfig.tiny(variant=variant, vocab_size=None if variant == "sd3" else 64)
    model = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert all(n is None or isinstance(n, str) for n in names), path
    assert model.blocks.attn.to_q.kernel.get_metadata()["out_sharding"] == (
        "layers", "embed", "heads")
    if variant == "unialignment":
        assert model.text_proj_out.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


def _lowered_and_compiled_hlo(num_layers: int) -> tuple[str, str]:
    config = MMDiTConfig.tiny(num_layers=num_layers)
    model = MMDiT(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, t, c):
        return nnx.merge(graphdef, state)(x, t, c, block_depth=2).sample

    args = (state, jnp.ones((1, 8, 8, 16)), jnp.ones((1,)), jnp.ones((1, 4, 32)))
    lowered = forward.lower(*args)
    return lowered.as_text(), lowered.compile().as_text()


def _dots(compiled_hlo: str) -> int:
    return len(re.findall(r"= \S+ dot\(", compiled_hlo))


def test_layers_are_scanned_so_compile_does_not_grow_with_depth():
    lowered_4, compiled_4 = _lowered_and_compiled_hlo(4)
    lowered_24, compiled_24 = _lowered_and_compiled_hlo(24)
    # One block body whatever the depth: the programs differ only in the stacked shapes...
    assert lowered_24.count("stablehlo.dot_general") == lowered_4.count("stablehlo.dot_general")
    # ...and the compiler keeps the loop (an unrolled scan would hold 6x the matmuls), so
    # compile time does not grow with depth: counted, not timed.
    assert _dots(compiled_4) > 0
    assert _dots(compiled_24) == _dots(compiled_4), (_dots(compiled_24), _dots(compiled_4))


def test_remat_policy_gives_same_gradients():
    config = MMDiTConfig.tiny()
    plain = MMDiT(config, rngs=nnx.Rngs(0))
    remat = MMDiT(config, rngs=nnx.Rngs(0), remat_policy="nothing_saveable")
    x, t, c = jnp.ones((1, 8, 8, 16)), jnp.full((1,), 300.0), jnp.ones((1, 4, 32))

    def loss(model):
        out = model(x, t, c, block_depth=1)
        return jnp.sum(out.sample ** 2) + jnp.sum(out.mid_image_proj)

    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown remat policy"):
        MMDiT(config, rngs=nnx.Rngs(0), remat_policy="save_everything_please")


def test_position_table_matches_diffusers():
    torch_embeddings = pytest.importorskip("diffusers.models.embeddings")
    expected = torch_embeddings.get_2d_sincos_pos_embed(48, 16, base_size=4,
                                                        output_type="np")
    ours = np.asarray(embeddings.sincos_2d_table(48, 16, 4))
    np.testing.assert_allclose(ours, np.asarray(expected), atol=2e-5)


def test_centred_crop_of_position_table():
    table = jnp.arange(6 * 6, dtype=jnp.float32).reshape(1, 36, 1)
    crop = embeddings.crop_positions(table, 6, 2, 4)  # top = 2, left = 1
    np.testing.assert_array_equal(np.asarray(crop).ravel(), [13, 14, 15, 16, 19, 20, 21, 22])
    with pytest.raises(ValueError, match="exceeds the position table"):
        embeddings.crop_positions(table, 6, 8, 2)
