"""Every attention kernel this CPU runs against jax.nn's XLA reference, and the kernel choice."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.models import attention

# (batch, Lq, Lk, heads, head_dim): joint attention over image + text tokens (64 + 8, odd
# 37 + 11) and cross-length attention (Lq != Lk, prime lengths)
SHAPES = [(2, 72, 72, 3, 16), (2, 48, 48, 3, 16), (1, 23, 53, 3, 16)]

KERNELS = {
    "blockwise": attention.blockwise_attention,
    # several query and key blocks; for the prime lengths the last ones are partly padding
    "blockwise-small-blocks": functools.partial(attention.blockwise_attention,
                                                block_q=16, block_kv=16),
    # the Pallas TPU kernel in interpret mode: checks the padding / masking / layout wrapper
    "splash-interpret": functools.partial(attention.splash_attention, interpret=True),
}


def reference(q, k, v, bias=None):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


def inputs(shape, with_bias, dtype, seed=0):
    b, lq, lk, h, d = shape
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, lq, h, d))
    k, v = (jax.random.normal(key, (b, lk, h, d)) for key in keys[1:3])
    bias = jax.random.normal(keys[3], (1, h, lq, lk)) if with_bias else None
    weights = jax.random.normal(keys[4], (b, lq, h, d))  # a random linear functional of the output
    return [t.astype(dtype) for t in (q, k, v)], bias, weights


@functools.partial(jax.jit, static_argnums=0)
def outputs_and_grads(fn, q, k, v, bias, weights):
    """The output and d<weights, output>/d(q, k, v[, bias]), all in float32; one compile per
    kernel and shape (the reference's is shared by every kernel)."""
    def attend(*args):
        out = fn(*args) if bias is None else fn(*args[:3], bias=args[3])
        return out.astype(jnp.float32)

    out, vjp = jax.vjp(attend, q, k, v, *([] if bias is None else [bias]))
    return [t.astype(jnp.float32) for t in (out, *vjp(weights))]


def assert_close(got, want, rtol, name):
    err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
    assert err <= rtol * scale, f"{name}: max |error| {err:.3g} > {rtol} x max |ref| {scale:.3g}"


def check(kernel, shape, with_bias, dtype, rtol):
    (q, k, v), bias, weights = inputs(shape, with_bias, dtype)
    upcast = [t.astype(jnp.float32) for t in (q, k, v)]
    want = outputs_and_grads(reference, *upcast, bias, weights)
    got = outputs_and_grads(KERNELS[kernel], q, k, v, bias, weights)
    for name, g, w in zip(("output", "dq", "dk", "dv", "dbias"), got, want):
        assert_close(g, w, rtol, f"{kernel} {shape} bias={with_bias} {name}")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["blockwise", "blockwise-small-blocks"])
def test_blockwise_matches_xla_float32(kernel, shape, with_bias):
    check(kernel, shape, with_bias, jnp.float32, 1e-4)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_splash_interpret_matches_xla_float32(shape):
    check("splash-interpret", shape, False, jnp.float32, 1e-4)


@pytest.mark.parametrize("kernel,with_bias", [("blockwise-small-blocks", True),
                                              ("splash-interpret", False)])
def test_bfloat16_inputs(kernel, with_bias):
    check(kernel, SHAPES[1], with_bias, jnp.bfloat16, 3e-2)


def test_auto_dispatch_on_this_backend():
    (q, k, v), bias, _ = inputs(SHAPES[2], True, jnp.bfloat16)
    out = attention.dot_product_attention(q, k, v, bias=bias)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(out, attention.blockwise_attention(q, k, v, bias=bias))


@pytest.mark.parametrize("backend,bias,dtype,expected", [
    ("gpu", False, None, "cudnn"),
    ("cuda", False, jnp.bfloat16, "cudnn"),
    ("gpu", True, jnp.float16, "cudnn"),  # JAX's cuDNN path takes the bias
    ("gpu", False, jnp.float32, "xla"),  # cuDNN needs fp16/bf16
    ("tpu", False, jnp.float32, "splash"),
    ("tpu", True, jnp.bfloat16, "xla"),  # splash has no bias: T5 stays on XLA
    ("cpu", False, jnp.float32, "blockwise"),
    ("cpu", True, jnp.float32, "blockwise"),
])
def test_auto_per_backend(backend, bias, dtype, expected):
    assert attention.resolve_implementation("auto", backend, bias=bias, dtype=dtype) == expected


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("name", ["xla", "blockwise"])
def test_portable_kernels_run_everywhere(name, backend):
    assert attention.resolve_implementation(name, backend, bias=True) == name


@pytest.mark.parametrize("name,backend,message", [
    ("flash", "cpu", r"unknown attention implementation 'flash'; choose one of \('auto'"),
    ("cudnn", "cpu", r"'cudnn' needs an NVIDIA GPU backend"),
    ("cudnn", "tpu", r"'cudnn' needs an NVIDIA GPU backend"),
    ("splash", "cpu", r"'splash' needs a TPU backend"),
    ("splash", "gpu", r"'splash' needs a TPU backend"),
])
def test_unknown_or_wrong_backend_is_an_error(name, backend, message):
    with pytest.raises(ValueError, match=message):
        attention.resolve_implementation(name, backend)


def test_splash_rejects_bias():
    with pytest.raises(ValueError, match="'splash' takes no additive bias"):
        attention.resolve_implementation("splash", "tpu", bias=True)


def test_kernel_is_chosen_for_the_mesh_devices_not_the_host():
    """A model whose mesh holds TPU devices (a topology's, compiled from this CPU host)
    resolves 'auto' as the TPU run does; without a mesh, the default backend decides."""
    from types import SimpleNamespace

    tpu_mesh = SimpleNamespace(mesh=SimpleNamespace(
        devices=np.array([SimpleNamespace(platform="tpu")] * 4)))
    assert attention.platform(tpu_mesh) == "tpu"
    assert attention.platform() == jax.default_backend()
    assert attention.resolve_implementation("auto", attention.platform(tpu_mesh)) == "splash"


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="splash runs on TPU")
def test_dispatch_checks_the_backend():
    (q, k, v), _, _ = inputs(SHAPES[2], False, jnp.float32)
    with pytest.raises(ValueError, match="needs a TPU backend"):
        attention.dot_product_attention(q, k, v, attention="splash")
    np.testing.assert_array_equal(
        attention.dot_product_attention(q, k, v, attention="xla"), reference(q, k, v, None))


# --------------------------------------------------------------------------------------------
# splash on a mesh: under shard_map, per device, on 8 simulated CPU devices

SHARDED_MESH = (2, 2, 2)  # data × fsdp × tensor: rows split 4 ways, heads 2 ways


def sharded_splash_report() -> dict:
    """Runs in a subprocess with 8 CPU devices: for 4 heads (split over tensor) and 3 heads
    (tensor does not divide them: the fallback), splash in interpret mode on the mesh vs the
    XLA reference, forward and gradients, plus whether the kernel ran under shard_map."""
    from jax.sharding import NamedSharding

    from unialign_jax.models import layers
    from unialign_jax.parallel import ActivationSharding, make_mesh

    mesh = make_mesh(*SHARDED_MESH, devices=jax.devices()[:8])
    shard = ActivationSharding(mesh)
    kernel = functools.partial(attention.splash_attention, interpret=True, shard=shard)
    report = {}
    for heads in (4, 3):
        shape = (4, 48, 48, heads, 16)
        (q, k, v), _, weights = inputs(shape, False, jnp.float32)
        place = NamedSharding(mesh, shard.spec(layers.HEADS, q.shape))
        q, k, v, weights = (jax.device_put(t, place) for t in (q, k, v, weights))
        got = outputs_and_grads(kernel, q, k, v, None, weights)
        want = outputs_and_grads(reference, q, k, v, None, weights)
        report[heads] = {
            "spec": str(place.spec),
            "errors": {name: float(jnp.abs(g - w).max() / jnp.abs(w).max())
                       for name, g, w in zip(("output", "dq", "dk", "dv"), got, want)},
            "shard_map": "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v))}
    return report


def test_splash_under_shard_map_matches_xla_on_a_sharded_mesh():
    """The device count is fixed before JAX starts, so this runs as a subprocess."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["4"]["spec"] == "P(('data', 'fsdp'), None, 'tensor', None)"
    assert report["3"]["spec"] == "P(('data', 'fsdp'), None, None, None)"
    for heads, r in report.items():
        assert r["shard_map"], f"{heads} heads: splash did not run under shard_map"
        for name, err in r["errors"].items():
            assert err <= 1e-4, f"{heads} heads {name}: relative error {err:.3g} > 1e-4"


if __name__ == "__main__":
    print(json.dumps(sharded_splash_report()))
