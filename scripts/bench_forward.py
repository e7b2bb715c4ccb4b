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
import json
import os
import platform
import sys
import tempfile
import time

PRESETS = {
    # name: (layers, heads, head_dim, joint_attention_dim)
    "small": (4, 4, 64, 512),
    "sd3-medium": (24, 24, 64, 4096),
}
POOLED_DIM = 2048


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--resolution", type=int, nargs="+", default=[256],
                   help="image sides in pixels (latent = side / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=77, help="context tokens (256 in the release)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute and weight dtype of both models")
    p.add_argument("--attention", nargs="+", default=["xla"], choices=["xla", "cudnn"],
                   help="jax.nn.dot_product_attention implementations to time")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks (default: all cores)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def main():
    args = parse_args()
    # Thread counts must be fixed before either framework starts.
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={args.threads}")
    import diffusers
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    layers, heads, head_dim, joint = PRESETS[args.preset]
    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
                  attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=joint, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=POOLED_DIM, out_channels=16,
                  pos_embed_max_size=max(192, max(args.resolution) // 16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    torch_model = diffusers.SD3Transformer2DModel(**config).eval()
    tmp = tempfile.TemporaryDirectory()
    torch_model.save_pretrained(os.path.join(tmp.name, "src"))
    torch_model = torch_model.to(device, tdtype)

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
    del torch_model
    if device == "cuda":
        torch.cuda.empty_cache()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import unialign_jax
    from convert.transformer import convert_transformer

    convert_transformer(os.path.join(tmp.name, "src"), os.path.join(tmp.name, "dst"),
                        dtype=args.dtype)
    results = []
    for impl in args.attention:
        model = unialign_jax.load_transformer(os.path.join(tmp.name, "dst"),
                                              dtype=jnp.dtype(args.dtype),
                                              attention_impl=None if impl == "xla" else impl)
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
    tmp.cleanup()
    summary = {"results": results, "threads": args.threads, "iters": args.iters,
               "jax_device": str(jax.devices()[0]), "torch_device": device,
               "torch_gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "machine": platform.processor() or platform.machine(),
               "versions": {"jax": jax.__version__, "torch": torch.__version__,
                            "diffusers": diffusers.__version__}}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
