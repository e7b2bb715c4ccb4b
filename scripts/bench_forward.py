"""Forward throughput of our MMDiT against diffusers' `SD3Transformer2DModel` (PyTorch).

Both run the same SD3-layout configuration with the same weights (the torch model is
converted with `unialign-convert transformer`), each in its own process pinned to the same
CPUs, timed interleaved (PyTorch, JAX, PyTorch, JAX …) after a warm-up call each; see
`bench_common` for why, and for when the ratio is withheld. Prints min / median / spread
of images/s for each side and the ratio JAX / PyTorch for every resolution and attention
implementation asked for (the models are built once).

    python scripts/bench_forward.py --preset small --resolution 512 --text-len 256   # CPU
    TMPDIR=/dev/shm python scripts/bench_forward.py --preset sd3-medium --dtype bfloat16 \\
        --resolution 512 1024 --attention xla cudnn --text-len 256                    # GPU
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
    add_common_arguments(p, default_batch=2, repeats=7, iters=2)
    p.add_argument("--resolution", type=int, nargs="+", default=[256],
                   help="image sides in pixels (latent = side / 8)")
    p.add_argument("--attention", nargs="+", default=["auto"], choices=attention_choices(),
                   help="attention kernels to time (unialign_jax.models.attention; auto: the "
                        "backend's fastest)")
    return p.parse_args()


def make_inputs(args) -> dict:
    """{resolution: (latents NCHW, context, pooled, timestep)}, the same in every process."""
    joint = PRESETS[args.preset][3]
    rng = np.random.default_rng(0)
    inputs = {}
    for res in args.resolution:
        side = res // 8
        inputs[res] = (rng.standard_normal((args.batch, 16, side, side), dtype=np.float32),
                       rng.standard_normal((args.batch, args.text_len, joint), dtype=np.float32),
                       rng.standard_normal((args.batch, POOLED_DIM), dtype=np.float32),
                       np.full((args.batch,), 500.0, np.float32))
    return inputs


def torch_side(args, folder: str) -> dict:
    """(In the PyTorch worker.) The random model, saved for the converter; call(res)."""
    import torch

    model, device, tdtype = random_sd3(args, max(args.resolution), folder)
    t = lambda a: torch.from_numpy(a).to(device, tdtype)  # noqa: E731
    kwargs = {res: dict(hidden_states=t(latents), encoder_hidden_states=t(context),
                        pooled_projections=t(pooled),
                        timestep=torch.from_numpy(timestep).to(device))
              for res, (latents, context, pooled, timestep) in make_inputs(args).items()}

    def call(res):
        with torch.inference_mode():
            out = model(**kwargs[res]).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    def run(res):
        call(res)  # the output stays in the worker

    return {"call": run, "output": lambda res: call(res).float().cpu().numpy(),
            "device": lambda: device if device == "cpu" else torch.cuda.get_device_name()}


def jax_side(args, folder: str) -> dict:
    """(In the JAX worker.) The converted model, one jitted forward per attention kernel."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    inputs = {res: (jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
                    jnp.asarray(context), jnp.asarray(pooled))
              for res, (latents, context, pooled, timestep) in make_inputs(args).items()}

    def jitted(impl):
        graphdef, state = nnx.split(load_converted(folder, args, impl))
        forward = jax.jit(lambda state, x, t, c, y:
                          nnx.merge(graphdef, state)(x, t, c, pooled=y).sample)
        return forward, state

    forwards = {impl: jitted(impl) for impl in args.attention}

    def call(impl, res):
        forward, state = forwards[impl]
        return forward(state, *inputs[res]).block_until_ready()

    def run(impl, res):
        call(impl, res)

    return {"call": run,
            "output": lambda impl, res: np.asarray(call(impl, res), np.float32)
            .transpose(0, 3, 1, 2),
            "device": lambda: jax.devices()[0].device_kind}


def main():
    args = parse_args()
    results = []
    with work_folder() as folder, Worker("PyTorch", args.threads, torch_side, args, folder) \
            as torch_worker, Worker("JAX", args.threads, jax_side, args, folder) as jax_worker:
        for impl in args.attention:
            for res in args.resolution:
                sides = {"PyTorch": torch_worker.caller("call", res),
                         "JAX": jax_worker.caller("call", impl, res)}
                watch = CpuWatch().start()
                timings = interleaved(sides, args.repeats, args.iters)
                record = compare(timings, watch.stop(), f"{res} px, attention {impl}, batch "
                                 f"{args.batch}: s per forward", ("PyTorch", "JAX"))
                y_torch = torch_worker.run("output", res)
                y_jax = jax_worker.run("output", impl, res)
                images_per_s = {name: {k: args.batch / side[k] for k in ("min", "median")}
                                for name, side in record["sides"].items()}
                results.append({
                    "preset": args.preset, "resolution": res, "batch": args.batch,
                    "text_len": args.text_len, "dtype": args.dtype, "attention": impl,
                    "jax_over_torch": record["ratio"],  # PyTorch s / JAX s = JAX img/s / PyTorch's
                    "images_per_s": images_per_s,
                    "max_rel_diff": float(np.abs(y_jax - y_torch).max()
                                          / np.abs(y_torch).max()),
                    "timing": record})
        env = environment({w.name: w.report() for w in (torch_worker, jax_worker)})
    print_setup(env)
    write_json(args.json, {"results": results, "repeats": args.repeats, "iters": args.iters,
                           "threads": args.threads, "args": vars(args), **env})


if __name__ == "__main__":
    main()
