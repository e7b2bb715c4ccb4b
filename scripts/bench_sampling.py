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
import sys
import time

from unialign_jax.models.attention import IMPLEMENTATIONS
from bench_common import (POOLED_DIM, PRESETS, add_common_arguments, environment, fix_threads,
                          load_converted, random_sd3, write_json)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, default_batch=1)
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent /8)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                   help="attention kernel (unialign_jax.models.attention; default: the "
                        "backend's fastest)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the whole loop each")
    return p.parse_args()


def main():
    args = parse_args()
    fix_threads(args.threads)
    import diffusers
    import numpy as np
    import torch

    torch_model, device, tdtype, folder = random_sd3(args, args.resolution)
    joint = PRESETS[args.preset][3]
    side = args.resolution // 8

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

    import jax.numpy as jnp
    from flax import nnx

    from unialign_jax.sampling import sample_images

    model = load_converted(folder, args, args.attention)
    folder.cleanup()

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
        "threads": args.threads, "repeats": args.repeats, "torch_loop_s": t_torch, "jax_loop_s": t_jax, "jax_first_call_s": t_compile,
        "speedup_jax_over_torch": t_torch / t_jax,
        "max_rel_diff_final_latents": float(np.abs(np.asarray(out) - ref_nhwc).max()
                                            / np.abs(ref_nhwc).max()),
        **environment(device),
    }
    write_json(args.json, result)
    print(f"{args.steps}-step CFG sampling: PyTorch {t_torch:.3f} s, JAX {t_jax:.3f} s "
          f"(first call with compilation {t_compile:.1f} s) -> ratio "
          f"{result['speedup_jax_over_torch']:.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
