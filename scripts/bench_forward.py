"""Forward throughput of our MMDiT against diffusers' `SD3Transformer2DModel` (PyTorch).

Both run the same SD3-layout configuration with the same weights (the torch model is
converted with `unialign-convert transformer`), on the same machine, in one run, with the
same number of CPU threads; torch is timed first so that XLA's thread pool cannot slow it.
Prints images/s for each and the ratio JAX / PyTorch for every resolution and attention
implementation asked for (the models are built once).

    python scripts/bench_forward.py                      # a mid-size config on this CPU
    TMPDIR=/dev/shm python scripts/bench_forward.py --preset sd3-medium --dtype bfloat16 \\
        --resolution 512 1024 --attention xla cudnn     # GPU
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
    add_common_arguments(p, default_batch=2)
    p.add_argument("--resolution", type=int, nargs="+", default=[256],
                   help="image sides in pixels (latent = side / 8)")
    p.add_argument("--attention", nargs="+", default=["auto"], choices=IMPLEMENTATIONS,
                   help="attention kernels to time (unialign_jax.models.attention; auto: the "
                        "backend's fastest)")
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args()


def main():
    args = parse_args()
    fix_threads(args.threads)
    import numpy as np
    import torch

    torch_model, device, tdtype, folder = random_sd3(args, max(args.resolution))
    joint = PRESETS[args.preset][3]
    rng = np.random.default_rng(0)
    inputs = {}
    for res in args.resolution:
        side = res // 8
        inputs[res] = (rng.standard_normal((args.batch, 16, side, side), dtype=np.float32),
                       rng.standard_normal((args.batch, args.text_len, joint), dtype=np.float32),
                       rng.standard_normal((args.batch, POOLED_DIM), dtype=np.float32),
                       np.full((args.batch,), 500.0, np.float32))

    def time_torch(latents, context, pooled, timestep):
        t = lambda a: torch.from_numpy(a).to(device, tdtype)  # noqa: E731
        kwargs = dict(hidden_states=t(latents), encoder_hidden_states=t(context),
                      pooled_projections=t(pooled), timestep=torch.from_numpy(timestep).to(device))
        with torch.inference_mode():
            torch_model(**kwargs)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                out = torch_model(**kwargs).sample
            if device == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.iters, out.float().cpu().numpy()

    torch_results = {res: time_torch(*inputs[res]) for res in args.resolution}
    torch_model = None  # free the accelerator for JAX
    if device == "cuda":
        torch.cuda.empty_cache()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    results = []
    for impl in args.attention:
        model = load_converted(folder, args, impl)
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, x, t, c, y):
            return nnx.merge(graphdef, state)(x, t, c, pooled=y).sample

        for res in args.resolution:
            latents, context, pooled, timestep = inputs[res]
            jargs = (state, jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
                     jnp.asarray(context), jnp.asarray(pooled))
            forward(*jargs).block_until_ready()  # compile + warm up
            start = time.perf_counter()
            for _ in range(args.iters):
                out = forward(*jargs)
            out.block_until_ready()
            t_jax = (time.perf_counter() - start) / args.iters
            t_torch, y_torch = torch_results[res]
            y_jax = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
            results.append({
                "preset": args.preset, "resolution": res, "batch": args.batch,
                "text_len": args.text_len, "dtype": args.dtype, "attention": impl,
                "jax_images_per_s": args.batch / t_jax,
                "torch_images_per_s": args.batch / t_torch,
                "jax_over_torch": t_torch / t_jax,
                "max_rel_diff": float(np.abs(y_jax - y_torch).max() / np.abs(y_torch).max())})
            r = results[-1]
            print(f"{res}px {impl}: JAX {r['jax_images_per_s']:.3f} img/s vs PyTorch "
                  f"{r['torch_images_per_s']:.3f} img/s → {r['jax_over_torch']:.2f}×",
                  file=sys.stderr)
    folder.cleanup()
    write_json(args.json, {"results": results, "threads": args.threads, "iters": args.iters,
                           **environment(device)})


if __name__ == "__main__":
    main()
