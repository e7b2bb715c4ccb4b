"""28-step CFG sampling: our jitted loop against the reference PyTorch loop, same weights.

The reference is written the way the release (and diffusers' SD3 pipeline) samples: an
eager `SD3Transformer2DModel` called once per step on the [negative, positive] batch,
guidance, then `FlowMatchEulerDiscreteScheduler(shift=3.0).step`. Ours is
`unialign_jax.sampling.sample_images`: the whole loop in one `jax.jit`. Both use the same
SD3-layout configuration and weights (converted with `unialign-convert transformer`), each
in its own process pinned to the same CPUs, timed interleaved (PyTorch, JAX, PyTorch, JAX …)
after a warm-up loop each (see `bench_common` for why, and for when the ratio is withheld);
their final latents are compared. Prints min / median / spread of the seconds per loop and
the ratio PyTorch seconds / ours.

    python scripts/bench_sampling.py --preset small                       # CPU
    python scripts/bench_sampling.py --preset sd3-medium --resolution 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import numpy as np

from bench_common import (POOLED_DIM, PRESETS, CpuWatch, Worker, add_common_arguments,
                          attention_choices, compare, environment, interleaved, load_converted,
                          print_setup, random_sd3, work_folder, write_json)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, default_batch=1, repeats=5, iters=1)
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent /8)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--attention", default="auto", choices=attention_choices(),
                   help="attention kernel (unialign_jax.models.attention; default: the "
                        "backend's fastest)")
    return p.parse_args()


def make_inputs(args):
    """(initial latents NCHW, context, negative context, pooled [negative, positive])."""
    joint = PRESETS[args.preset][3]
    side, b = args.resolution // 8, args.batch
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, 16, side, side), dtype=np.float32),
            rng.standard_normal((b, args.text_len, joint), dtype=np.float32),
            rng.standard_normal((1, args.text_len, joint), dtype=np.float32),
            rng.standard_normal((2 * b, POOLED_DIM), dtype=np.float32))


def torch_side(args, folder: str) -> dict:
    """(In the PyTorch worker.) The reference loop, as diffusers' StableDiffusion3Pipeline
    runs it, on the random model it saves for the converter."""
    import diffusers
    import torch

    model, device, tdtype = random_sd3(args, args.resolution, folder)
    init, context, negative, pooled = make_inputs(args)
    b = args.batch
    t = lambda a: torch.from_numpy(a).to(device, tdtype)  # noqa: E731
    ctx = torch.cat([t(np.repeat(negative, b, 0)), t(context)])
    pool = t(pooled)
    final = []

    def loop():
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                              shift=3.0)
        scheduler.set_timesteps(args.steps, device=device)
        latents = t(init)
        with torch.inference_mode():
            for step in scheduler.timesteps:
                x = torch.cat([latents] * 2)
                v = model(hidden_states=x, timestep=step.expand(x.shape[0]),
                          encoder_hidden_states=ctx, pooled_projections=pool).sample
                v_neg, v_pos = v.chunk(2)
                v = v_neg + args.guidance * (v_pos - v_neg)
                latents = scheduler.step(v, step, latents).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()
        final[:] = [latents]

    return {"call": loop, "output": lambda: final[0].float().cpu().numpy(),
            "device": lambda: device if device == "cpu" else torch.cuda.get_device_name()}


def jax_side(args, folder: str) -> dict:
    """(In the JAX worker.) `sample_images` on the converted model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unialign_jax.sampling import sample_images

    init, context, negative, pooled = make_inputs(args)
    model = load_converted(folder, args, args.attention)

    class WithPooled(nnx.Module):
        """SD3 needs the pooled CLIP vector besides the context; UniAlignment does not."""

        def __init__(self, model, pooled):
            self.model, self.pooled = model, nnx.Variable(jnp.asarray(pooled))

        def __call__(self, latents, timestep, context, *, conditions=()):
            return self.model(latents, timestep, context, pooled=self.pooled[...])

    wrapped = WithPooled(model, pooled)
    jargs = (jnp.asarray(init.transpose(0, 2, 3, 1)), jnp.asarray(context), jnp.asarray(negative))
    final = []

    def loop():
        final[:] = [sample_images(wrapped, *jargs, num_steps=args.steps,
                                  guidance_scale=args.guidance, shift=3.0).block_until_ready()]

    return {"call": loop,
            "output": lambda: np.asarray(final[0], np.float32).transpose(0, 3, 1, 2),
            "device": lambda: jax.devices()[0].device_kind}


def main():
    args = parse_args()
    with work_folder() as folder, Worker("PyTorch", args.threads, torch_side, args, folder) \
            as torch_worker, Worker("JAX", args.threads, jax_side, args, folder) as jax_worker:
        watch = CpuWatch().start()
        timings = interleaved({"PyTorch": torch_worker.caller("call"),
                               "JAX": jax_worker.caller("call")}, args.repeats, args.iters)
        record = compare(timings, watch.stop(),
                         f"{args.steps}-step CFG sampling, {args.resolution} px, batch "
                         f"{args.batch}: s per loop (JAX's first call compiles)",
                         ("PyTorch", "JAX"))
        ref, out = torch_worker.run("output"), jax_worker.run("output")
        env = environment({w.name: w.report() for w in (torch_worker, jax_worker)})
    print_setup(env)
    write_json(args.json, {
        "preset": args.preset, "resolution": args.resolution, "batch": args.batch,
        "text_len": args.text_len, "steps": args.steps, "dtype": args.dtype,
        "attention": args.attention, "threads": args.threads, "repeats": args.repeats,
        "iters": args.iters,
        "speedup_jax_over_torch": record["ratio"],  # PyTorch s / JAX s
        "jax_first_call_s": record["sides"]["JAX"]["warmup_s"],
        "max_rel_diff_final_latents": float(np.abs(out - ref).max() / np.abs(ref).max()),
        "timing": record, "args": vars(args), **env})


if __name__ == "__main__":
    main()
