"""Forward throughput of our MMDiT against diffusers' `SD3Transformer2DModel` (PyTorch).

Both run the same SD3-layout configuration with the same weights (the torch model is
converted with `unialign-convert transformer`), on the same machine, in one run, with the
same number of CPU threads. Prints images/s for each and the ratio JAX / PyTorch.

    python scripts/bench_forward.py                      # a mid-size config on this CPU
    python scripts/bench_forward.py --preset sd3-medium --dtype bfloat16 --resolution 1024  # GPU
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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent /8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                   help="jax.nn.dot_product_attention implementation (default: XLA's choice)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks (default: all cores)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args()


def main():
    args = parse_args()
    # Thread counts must be fixed before either framework starts.
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={args.threads}")
    import torch
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np

    import unialign_jax
    from convert.transformer import convert_transformer

    torch.set_num_threads(args.threads)
    layers, heads, head_dim, joint = PRESETS[args.preset]
    config = dict(sample_size=args.resolution // 8, patch_size=2, in_channels=16,
                  num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=joint, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=max(192, args.resolution // 16))
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    torch_model = diffusers.SD3Transformer2DModel(**config).eval()

    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(os.path.join(tmp, "src"))
        convert_transformer(os.path.join(tmp, "src"), os.path.join(tmp, "dst"))
        model = unialign_jax.load_transformer(os.path.join(tmp, "dst"),
                                              dtype=jnp.dtype(args.dtype),
                                              attention_impl=args.attention)
    torch_model = torch_model.to(torch_device, tdtype)

    side = args.resolution // 8
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.batch, 16, side, side), dtype=np.float32)
    context = rng.standard_normal((args.batch, args.text_len, joint), dtype=np.float32)
    pooled = rng.standard_normal((args.batch, 2048), dtype=np.float32)
    timestep = np.full((args.batch,), 500.0, np.float32)

    from flax import nnx
    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_forward(state, x, t, c, y):
        return nnx.merge(graphdef, state)(x, t, c, pooled=y).sample

    jargs = (state, jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
             jnp.asarray(context), jnp.asarray(pooled))
    targs = dict(hidden_states=torch.from_numpy(latents).to(torch_device, tdtype),
                 encoder_hidden_states=torch.from_numpy(context).to(torch_device, tdtype),
                 pooled_projections=torch.from_numpy(pooled).to(torch_device, tdtype),
                 timestep=torch.from_numpy(timestep).to(torch_device))

    def time_jax():
        jax_forward(*jargs).block_until_ready()  # compile + warm up
        start = time.perf_counter()
        for _ in range(args.iters):
            out = jax_forward(*jargs)
        out.block_until_ready()
        return (time.perf_counter() - start) / args.iters, np.asarray(out, np.float32)

    def time_torch():
        with torch.inference_mode():
            torch_model(**targs)
            if torch_device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                out = torch_model(**targs).sample
            if torch_device == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.iters, out.float().cpu().numpy()

    t_torch, y_torch = time_torch()
    t_jax, y_jax = time_jax()
    err = float(np.abs(y_jax.transpose(0, 3, 1, 2) - y_torch).max() / np.abs(y_torch).max())
    result = {
        "preset": args.preset, "resolution": args.resolution, "batch": args.batch,
        "dtype": args.dtype, "attention": args.attention, "threads": args.threads, "iters": args.iters,
        "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0]),
        "torch_device": torch_device, "machine": platform.processor() or platform.machine(),
        "jax_images_per_s": args.batch / t_jax, "torch_images_per_s": args.batch / t_torch,
        "speedup_jax_over_torch": t_torch / t_jax, "max_rel_diff": err,
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    print(json.dumps(result, indent=2))
    print(f"JAX {result['jax_images_per_s']:.3f} img/s vs PyTorch "
          f"{result['torch_images_per_s']:.3f} img/s → ratio {result['speedup_jax_over_torch']:.2f}×",
          file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
