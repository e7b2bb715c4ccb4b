"""The analytical FLOP count behind MFU: a hand count for a tiny config, and the matrix
products and convolutions JAX actually traces for the same models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.t5 import T5Config, T5Encoder
from unialign_jax.models.vae import AutoencoderKL, VAEConfig
from unialign_jax.training import flops

TINY = MMDiTConfig.tiny(vocab_size=50)   # 2 layers, width 32, patch 2, 16 channels
T5_TINY = T5Config(vocab_size=60, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=2)
VAE_TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def test_hand_count_of_a_tiny_mmdit_pass():
    # 16×16 latents → 8×8 = 64 target tokens, one condition image (+64), 8 text tokens.
    img, txt, w = 128, 8, 32
    n = img + txt
    embed = 2 * img * 64 * w + 2 * txt * 32 * w + 2 * 256 * w + 2 * w * w
    per_block = (2 * (2 * w * 6 * w)                    # norm1, norm1_context
                 + 2 * (img + txt) * w * w * 4            # q, k, v, out of both streams
                 + 2 * (img + txt) * w * 4 * w * 2        # MLP in and out of both streams
                 + 2 * n * n * w * 2)                     # scores and mixing
    heads = 2 * w * 2 * w + 2 * 64 * w * 64 + 2 * txt * w * 50
    adapters = 2 * (2 * w * 24 + 2 * 24 * 40)
    want = embed + 2 * per_block + heads + adapters
    assert flops.mmdit_forward(TINY, img, txt, target_tokens=64) == want


def test_hand_count_of_a_sample_sums_its_parts():
    shape = flops.StepShape(resolution=32, text_tokens=8, condition_images=1)
    parts = flops.sample_flops(TINY, T5_TINY, VAE_TINY, shape)
    # VAE factor 2 → 16×16 latents → 64 target tokens.
    assert parts["image_pass"] == 3 * flops.mmdit_forward(TINY, 128, 8, 64)
    assert parts["caption_pass"] == 3 * flops.mmdit_forward(TINY, 64, 8)
    assert parts["t5"] == 2 * flops.t5_forward(T5_TINY, 8)
    assert parts["vae"] == 2 * flops.vae_encode(VAE_TINY, 32, 32)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def traced_flops(fn, *args) -> int:
    """2·(multiply-adds) of every dot_general and convolution in `fn`'s jaxpr (scans counted
    once per iteration)."""
    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape        # (kh, kw, cin, cout) for HWIO
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[:-1])
            inner = 0
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        inner += walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        inner += walk(sub)
            total += inner * (eqn.params["length"] if name == "scan" else 1)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_the_count_equals_what_the_models_trace():
    model = MMDiT(TINY, rngs=nnx.Rngs(0), attention="xla")
    latents = jnp.zeros((1, 16, 16, 16))
    context = jnp.zeros((1, 8, 32))
    traced = traced_flops(lambda x, c, s: model(x, jnp.zeros(1), c, conditions=(s,),
                                                block_depth=1), latents, context, latents)
    assert traced == flops.mmdit_forward(TINY, 128, 8, target_tokens=64)

    t5 = T5Encoder(T5_TINY, rngs=nnx.Rngs(0), attention="xla")
    assert traced_flops(t5, jnp.zeros((1, 8), jnp.int32)) == flops.t5_forward(T5_TINY, 8)

    vae = AutoencoderKL(VAE_TINY, rngs=nnx.Rngs(0), attention="xla")
    images = jnp.zeros((1, 32, 32, 3))
    assert traced_flops(lambda x: vae.posterior(x)[0], images) == \
        flops.vae_encode(VAE_TINY, 32, 32)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("TPU v5 lite", 197.0), ("TPU v4", 275.0),
                                        ("TPU v6 lite", 918.0), ("cpu", None)])
def test_peaks_and_mfu(kind, peak):
    assert flops.peak_tflops(kind) == peak
    got = flops.mfu(samples_per_second=10.0, flops_per_sample=20e12, chips=2, device_kind=kind)
    if peak is None:
        assert got is None
    else:
        np.testing.assert_allclose(got, 10.0 * 20e12 / (2 * peak * 1e12))


def tiny_preset_flops(shape) -> float:
    """Model FLOPs per sample of scripts/bench_train.py's `tiny` preset, from its sizes."""
    return flops.sample_flops(
        MMDiTConfig(num_layers=2, num_heads=2, head_dim=32, joint_attention_dim=64,
                    vocab_size=512),
        T5Config(num_layers=2, d_model=64, num_heads=2, head_dim=64, d_ff=128, vocab_size=512),
        VAEConfig(block_out_channels=(16, 32, 32, 32), norm_num_groups=16), shape)["total"]


def test_bench_train_runs_in_its_ci_sized_form(tmp_path):
    """scripts/bench_train.py, tiny preset at 32 px, with the PyTorch reference: a result row
    with the FLOP count of this module (no timing is checked)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "bench_train.py"), "--preset", "tiny",
         "--resolution", "32", "--iters", "1", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["task"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"t2i"}
    for task, row in rows.items():
        want = tiny_preset_flops(flops.StepShape(32, 16, int(task == "edit")))
        np.testing.assert_allclose(row["model_tflop_per_sample"], want / 1e12, rtol=1e-12)
        assert row["mfu"] is None                      # no peak for a CPU
        if row["warnings"]:                            # a busy machine: no ratio
            assert row["jax_over_torch"] is None
        else:
            assert row["jax_over_torch"] == pytest.approx(
                row["torch_step_s"]["median"] / row["step_s"]["median"])
