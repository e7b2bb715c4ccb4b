"""28-step CFG sampling: our jitted loop against the reference PyTorch loop, same weights.

The reference is written the way the release (and diffusers' SD3 pipeline) samples: an
eager `SD3Transformer2DModel` called once per step on the [negative, positive] batch,
guidance, then `FlowMatchEulerDiscreteScheduler(shift=3.0).step`. Ours is
`unialign_jax.sampling.sample_images`: the whole loop in one `jax.jit`. Both use the same
SD3-layout configuration and weights (converted with `unialign-convert transformer`), run
on the same machine in one process with the same CPU threads (torch first, before JAX
starts its thread pool), and their final latents are compared. Prints a JSON summary and
the ratio (PyTorch seconds / ours).

    python scripts/bench_sampling.py                         # small config on this CPU
    python scripts/bench_sampling.py --preset sd3-medium --resolution 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

PRESETS = {
    # name: (layers, heads, head_dim, joint_attention_dim)
    "tiny": (2, 2, 32, 64),
    "small": (4, 4, 64, 512),
    "sd3-medium": (24, 24, 64, 4096),
}
POOLED_DIM = 2048


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent /8)")
    p.add_argument("--batch", type=int, default=1, help="images (the model sees twice as many)")
    p.add_argument("--text-len", type=int, default=77, help="context tokens (256 in the release)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute and weight dtype of both models")
    p.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                   help="jax.nn.dot_product_attention implementation (default: XLA's choice)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the whole loop each")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks (default: all cores)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={args.threads}")
    import diffusers
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    layers, heads, head_dim, joint = PRESETS[args.preset]
    side = args.resolution // 8
    config = dict(sample_size=side, patch_size=2, in_channels=16, num_layers=layers,
                  attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=joint, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=POOLED_DIM, out_channels=16,
                  pos_embed_max_size=max(192, args.resolution // 16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    torch_model = diffusers.SD3Transformer2DModel(**config).eval()
    tmp = tempfile.TemporaryDirectory()
    torch_model.save_pretrained(os.path.join(tmp.name, "src"))
    torch_model = torch_model.to(device, tdtype)

    rng = np.random.default_rng(0)
    b = args.batch
    init = rng.standard_normal((b, 16, side, side), dtype=np.float32)
    context = rng.standard_normal((b, args.text_len, joint), dtype=np.float32)
    negative = rng.standard_normal((1, args.text_len, joint), dtype=np.float32)
    pooled = rng.standard_normal((2 * b, POOLED_DIM), dtype=np.float32)  # [negative, positive]

    def torch_loop():
        """The reference loop, as diffusers' StableDiffusion3Pipeline runs it."""
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                              shift=3.0)
        scheduler.set_timesteps(args.steps, device=device)
        t = lambda a: torch.from_numpy(a).to(device, tdtype)  # noqa: E731
        ctx = torch.cat([t(np.repeat(negative, b, 0)), t(context)])
        pool, latents = t(pooled), t(init)
        with torch.inference_mode():
            for step in scheduler.timesteps:
                x = torch.cat([latents] * 2)
                v = torch_model(hidden_states=x, timestep=step.expand(x.shape[0]),
                                encoder_hidden_states=ctx, pooled_projections=pool).sample
                v_neg, v_pos = v.chunk(2)
                v = v_neg + args.guidance * (v_pos - v_neg)
                latents = scheduler.step(v, step, latents).prev_sample
            if device == "cuda":
                torch.cuda.synchronize()
        return latents.float().cpu().numpy()

    torch_loop()  # warm-up (cuDNN / allocator)
    start = time.perf_counter()
    for _ in range(args.repeats):
        ref = torch_loop()
    t_torch = (time.perf_counter() - start) / args.repeats

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import unialign_jax
    from convert.transformer import convert_transformer
    from unialign_jax.sampling import sample_images

    convert_transformer(os.path.join(tmp.name, "src"), os.path.join(tmp.name, "dst"))
    model = unialign_jax.load_transformer(os.path.join(tmp.name, "dst"),
                                          dtype=jnp.dtype(args.dtype),
                                          param_dtype=jnp.dtype(args.dtype),
                                          attention_impl=args.attention)
    tmp.cleanup()

    class WithPooled(nnx.Module):
        """SD3 needs the pooled CLIP vector besides the context; UniAlignment does not."""

        def __init__(self, model, pooled):
            self.model, self.pooled = model, nnx.Variable(jnp.asarray(pooled))

        def __call__(self, latents, timestep, context, *, conditions=()):
            return self.model(latents, timestep, context, pooled=self.pooled[...])

    wrapped = WithPooled(model, pooled)
    jargs = (jnp.asarray(init.transpose(0, 2, 3, 1)), jnp.asarray(context), jnp.asarray(negative))

    def jax_loop():
        return sample_images(wrapped, *jargs, num_steps=args.steps,
                             guidance_scale=args.guidance, shift=3.0).block_until_ready()

    start = time.perf_counter()
    jax_loop()
    t_compile = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = jax_loop()
    t_jax = (time.perf_counter() - start) / args.repeats

    ref_nhwc = ref.transpose(0, 2, 3, 1)
    result = {
        "preset": args.preset, "resolution": args.resolution, "batch": b,
        "text_len": args.text_len, "steps": args.steps, "dtype": args.dtype,
        "attention": args.attention,
        "threads": args.threads, "repeats": args.repeats,
        "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0]),
        "torch_device": device, "machine": platform.processor() or platform.machine(),
        "torch_loop_s": t_torch, "jax_loop_s": t_jax, "jax_first_call_s": t_compile,
        "speedup_jax_over_torch": t_torch / t_jax,
        "max_rel_diff_final_latents": float(np.abs(np.asarray(out) - ref_nhwc).max()
                                            / np.abs(ref_nhwc).max()),
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    print(json.dumps(result, indent=2))
    print(f"{args.steps}-step CFG sampling: PyTorch {t_torch:.3f} s, JAX {t_jax:.3f} s "
          f"(first call with compilation {t_compile:.1f} s) -> ratio "
          f"{result['speedup_jax_over_torch']:.2f}x", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
