"""Time every attention implementation this backend runs against torch's SDPA.

    python scripts/bench_attention.py                              # default shapes, float32
    python scripts/bench_attention.py --shapes 2x24x1280x64 --dtype bfloat16 --repeats 9
    python scripts/bench_attention.py --shapes 2x64x256x64 --bias  # T5-style: bias, scale 1

Shapes are BxHxLxD (self-attention, L = image + text tokens). Forward and forward+backward
(gradients of a random linear functional w.r.t. q, k, v) are jitted. Torch and JAX each run
in their own process pinned to the same CPUs, and for each shape and direction every
implementation is timed interleaved with torch (torch, impl 1, impl 2, …, torch, …) after a
warm-up call each; each gets min / median / spread and, on a quiet run, its ratio to torch's
median (see `bench_common` for why, and for when ratios are withheld). The "xla" and "einsum"
rows materialise the whole (B, H, L, L) score matrix: mind memory for big shapes. "einsum" is
not an implementation: it checks whether a plain einsum + softmax in (B, H, L, D) layout
beats jax.nn.dot_product_attention.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench_common import (CpuWatch, Worker, add_timing_arguments, compare, environment,
                          interleaved, print_setup, write_json)

# 512px (1024 image + 256 text tokens) and 1024px (4096 + 256) at the small preset's 4 heads,
# and 512px at SD3-medium's 24 heads; 1x24x4352x64 also works but "xla" takes ~12 s a call
DEFAULT_SHAPES = ["4x4x1280x64", "2x4x4352x64", "2x24x1280x64"]


def make_arrays(shape: str, bias: bool):
    """(q, k, v, w in (B, L, H, D), bias (1, H, L, L) or None, scale), the same in every
    process."""
    b, h, length, d = map(int, shape.split("x"))
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((b, length, h, d), np.float32) for _ in range(4)]
    mask = rng.standard_normal((1, h, length, length), np.float32) if bias else None
    return (*arrays, mask, 1.0 if bias else None)


def torch_side(args) -> dict:
    """(In the PyTorch worker.) SDPA forward / forward+backward per shape."""
    import torch

    torch.set_num_threads(args.threads)
    tdtype = getattr(torch, args.dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {}

    def prepared(shape):
        if shape not in calls:
            *arrays, bias, scale = make_arrays(shape, args.bias)
            # torch's SDPA takes (B, H, L, D)
            q, k, v, w = (torch.from_numpy(a).transpose(1, 2).contiguous().to(tdtype)
                          for a in arrays)
            mask = None if bias is None else torch.from_numpy(bias).to(tdtype)

            def forward():
                with torch.no_grad():
                    sdpa(q, k, v, attn_mask=mask, scale=scale)

            def backward():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                (sdpa(*leaves, attn_mask=mask, scale=scale) * w).sum().backward()

            calls[shape] = {"forward": forward, "backward": backward}
        return calls[shape]

    return {"forward": lambda shape: prepared(shape)["forward"](),
            "backward": lambda shape: prepared(shape)["backward"](), "device": lambda: "cpu"}


def jax_side(args) -> dict:
    """(In the JAX worker.) Every implementation's jitted forward and gradients per shape."""
    import jax
    import jax.numpy as jnp

    from unialign_jax.models import attention

    impls = args.impls
    if impls is None:
        impls = ["einsum"]
        for name in attention.IMPLEMENTATIONS[1:]:
            try:
                attention.resolve_implementation(name, bias=args.bias)
                impls.append(name)
            except ValueError:
                pass
    calls = {}

    def prepared(impl, shape):
        if (impl, shape) in calls:
            return calls[impl, shape]
        *arrays, bias, scale = make_arrays(shape, args.bias)
        if impl == "einsum":
            def attend(q, k, v, b):
                q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
                s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (scale or q.shape[-1] ** -0.5)
                p = jax.nn.softmax(s if b is None else s + b, axis=-1)
                return jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3)
        else:
            def attend(q, k, v, b):
                return attention.dot_product_attention(q, k, v, attention=impl, bias=b,
                                                       scale=scale)

        q, k, v, w = (jnp.asarray(a, args.dtype) for a in arrays)
        b = None if bias is None else jnp.asarray(bias, args.dtype)
        forward = jax.jit(attend)
        grads = jax.jit(jax.grad(lambda q, k, v, b: (attend(q, k, v, b).astype(jnp.float32)
                                                     * w).sum(), argnums=(0, 1, 2)))
        calls[impl, shape] = {
            "forward": lambda: forward(q, k, v, b).block_until_ready(),
            "backward": lambda: jax.block_until_ready(grads(q, k, v, b))}
        return calls[impl, shape]

    def run(direction, impl, shape):
        prepared(impl, shape)[direction]()

    return {"impls": lambda: impls,
            "auto": lambda: attention.resolve_implementation(bias=args.bias),
            "forward": lambda impl, shape: run("forward", impl, shape),
            "backward": lambda impl, shape: run("backward", impl, shape),
            "device": lambda: jax.devices()[0].device_kind}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxHxLxD ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--bias", action="store_true",
                   help="add a (1, H, L, L) bias and use scale 1, like T5")
    p.add_argument("--impls", nargs="+", default=None,
                   help="implementations to time (default: all this backend runs, + einsum)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    add_timing_arguments(p, repeats=7, iters=1)
    args = p.parse_args(argv)

    results = []
    with Worker("PyTorch", args.threads, torch_side, args) as torch_worker, \
            Worker("JAX", args.threads, jax_side, args) as jax_worker:
        impls = jax_worker.run("impls")
        print(f"dtype {args.dtype}, bias {args.bias}, 'auto' -> {jax_worker.run('auto')}")
        directions = ["forward"] + ([] if args.no_backward else ["backward"])
        for shape in args.shapes:
            for direction in directions:
                sides = {"torch": torch_worker.caller(direction, shape),
                         **{impl: jax_worker.caller(direction, impl, shape) for impl in impls}}
                watch = CpuWatch().start()
                record = compare(interleaved(sides, args.repeats, args.iters), watch.stop(),
                                 f"{shape} {direction}: s per call")
                medians = {k: s["median"] for k, s in record["sides"].items()}
                record["ratio_to_torch"] = None if record["warnings"] else {
                    impl: medians[impl] / medians["torch"] for impl in impls}
                if record["ratio_to_torch"]:
                    print("  / torch (medians): " + ", ".join(
                        f"{impl} {r:.2f}×" for impl, r in record["ratio_to_torch"].items()),
                          flush=True)
                results.append({"shape": shape, "direction": direction, **record})
        env = environment({w.name: w.report() for w in (torch_worker, jax_worker)})
    print_setup(env)
    write_json(args.json, {"results": results, "dtype": args.dtype, "bias": args.bias,
                           "repeats": args.repeats, "iters": args.iters,
                           "threads": args.threads, "args": vars(args), **env})


if __name__ == "__main__":
    main()
