"""Mesh sizing and the logical-axis rules (pure functions of shapes: no compilation)."""

import numpy as np
import pytest

import jax
from jax.sharding import Mesh, PartitionSpec as P

from unialign_jax.parallel import mesh as mesh_lib
from unialign_jax.parallel import rules


class FakeMesh:
    """Only `.shape` is read by `logical_to_mesh`: lets one device stand in for a pod."""

    def __init__(self, **shape):
        self.shape = shape


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert mesh_lib.mesh_shape(64, 1, -1, 1) == (1, 64, 1)
    assert mesh_lib.mesh_shape(8, 2, -1, 1) == (2, 4, 1)
    assert mesh_lib.mesh_shape(8, -1, 2, 2) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.mesh_shape(8, -1, -1, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        mesh_lib.mesh_shape(8, 3, -1, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_lib.mesh_shape(8, 2, 3, 1)
    with pytest.raises(ValueError, match="positive"):
        mesh_lib.mesh_shape(8, 0, -1, 1)


def test_make_mesh_axes():
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    assert isinstance(mesh, Mesh) and mesh.axis_names == ("data", "fsdp", "tensor")


def test_rules_fsdp_and_tensor():
    m = FakeMesh(data=2, fsdp=4, tensor=2)
    # Stacked block kernel: layers whole, width over fsdp, heads over tensor.
    assert rules.logical_to_mesh(P("layers", "embed", "heads"), (24, 1536, 1536), m) == \
        P(None, "fsdp", "tensor")
    # T5 embedding table: vocabulary over tensor, width over fsdp.
    assert rules.logical_to_mesh(P("vocab", "embed"), (32128, 4096), m) == P("tensor", "fsdp")
    # The context embedder's two axes never reuse one mesh axis.
    spec = rules.logical_to_mesh(P("context_embed", "embed"), (4096, 1536), m)
    assert spec == P("tensor", "fsdp")
    # Replicated annotations and trailing unannotated dims.
    assert rules.logical_to_mesh(P(None, None, "embed"), (1, 36864, 1536), m) == \
        P(None, None, "fsdp")
    assert rules.logical_to_mesh(P(), (3, 5), m) == P(None, None)


def test_rules_fall_back_to_replicated_when_not_divisible_or_reused():
    m = FakeMesh(data=1, fsdp=64, tensor=1)
    assert rules.logical_to_mesh(P("conv_in", "conv_out"), (3, 3), m) == P(None, None)
    assert rules.logical_to_mesh(P("embed"), (96,), m) == P(None)        # 96 % 64 != 0
    assert rules.logical_to_mesh(P("embed", "teacher"), (1536, 3584), m) == P("fsdp", None)
    # Mesh axes of size 1 are not named at all.
    assert rules.logical_to_mesh(P("heads"), (1536,), m) == P(None)


def test_unknown_logical_axis_is_a_clear_error():
    with pytest.raises(ValueError, match="no rule"):
        rules.logical_to_mesh(P("bogus"), (8,), FakeMesh(data=1, fsdp=8, tensor=1))


def test_every_model_annotation_has_a_rule():
    """Full-size transformer, T5-XXL and the SD3 VAE, abstractly: every name is known."""
    from flax import nnx
    from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
    from unialign_jax.models.t5 import T5Config, T5Encoder
    from unialign_jax.models.vae import AutoencoderKL, VAEConfig

    m = FakeMesh(data=2, fsdp=16, tensor=2)
    builds = {"transformer": lambda: MMDiT(MMDiTConfig(), rngs=nnx.Rngs(0)),
              "t5": lambda: T5Encoder(T5Config(), rngs=nnx.Rngs(0)),
              "vae": lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0))}
    fraction = {}
    for name, build in builds.items():
        state = nnx.state(nnx.eval_shape(build))
        specs = nnx.get_partition_spec(state)
        sharded = total = 0
        for spec, x in zip(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
                           jax.tree.leaves(state)):
            mesh_spec = rules.logical_to_mesh(spec, x.shape, m)
            size = int(np.prod(x.shape))
            total += size
            if "fsdp" in jax.tree.leaves(tuple(mesh_spec)):
                sharded += size
        fraction[name] = sharded / total
    # The two big models are split over fsdp almost entirely (no chip holds either whole);
    # the small VAE is replicated by design (see LOGICAL_AXIS_RULES).
    assert fraction["transformer"] > 0.99 and fraction["t5"] > 0.99, fraction
    assert fraction["vae"] == 0.0


def test_batch_sharding_splits_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    assert rules.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_activation_rules_split_the_batch_and_keep_the_width_whole():
    m = FakeMesh(data=2, fsdp=4, tensor=2)
    tokens = ("activation_batch", "activation_length", "activation_embed")
    assert rules.logical_to_mesh(tokens, (16, 1280, 1536), m) == P(("data", "fsdp"), None, None)
    heads = ("activation_batch", "activation_length", "activation_heads", None)
    assert rules.logical_to_mesh(heads, (16, 1280, 24, 64), m) == \
        P(("data", "fsdp"), None, "tensor", None)
    # A batch the batch axes do not divide stays whole (sampling one image on 8 devices).
    assert rules.logical_to_mesh(tokens, (1, 1280, 1536), m) == P(None, None, None)


def test_activation_sharding_is_the_identity_on_one_device():
    x = jax.numpy.ones((4, 3))
    shard = rules.ActivationSharding(mesh_lib.make_mesh(devices=jax.devices()[:1]))
    assert shard(x, ("activation_batch", None)) is x
    assert hash(shard) == hash(rules.ActivationSharding(shard.mesh))  # a static jit key
