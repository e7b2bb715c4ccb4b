"""Time every attention implementation this backend runs against torch's SDPA.

    python scripts/bench_attention.py                              # default shapes, float32
    python scripts/bench_attention.py --shapes 2x24x1280x64 --dtype bfloat16 --runs 9
    python scripts/bench_attention.py --shapes 2x64x256x64 --bias  # T5-style: bias, scale 1

Shapes are BxHxLxD (self-attention, L = image + text tokens). Forward and forward+backward
(gradients of a random linear functional w.r.t. q, k, v) are jitted; each row gives the median
of --runs timed calls after one warm-up, with min-max, and the ratio to torch. Torch runs first
with torch.set_num_threads(os.cpu_count()), the thread count XLA:CPU uses by default. The
"xla" and "einsum" rows materialise the whole (B, H, L, L) score matrix: mind memory for big
shapes. "einsum" is not an implementation: it checks whether a plain einsum + softmax in
(B, H, L, D) layout beats jax.nn.dot_product_attention. Other processes on the machine skew
the figures badly: compare rows of one run, and rerun when torch's own times move.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

# 512px (1024 image + 256 text tokens) and 1024px (4096 + 256) at the small preset's 4 heads,
# and 512px at SD3-medium's 24 heads; 1x24x4352x64 also works but "xla" takes ~12 s a call
DEFAULT_SHAPES = ["4x4x1280x64", "2x4x4352x64", "2x24x1280x64"]


def timed(fn, runs: int) -> list[float]:
    """Milliseconds of `runs` calls of `fn` after one warm-up (compile) call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def torch_times(arrays, w, bias, scale, dtype, runs, backward):
    import torch

    torch.set_num_threads(os.cpu_count())
    tdtype = getattr(torch, dtype)
    # torch's SDPA takes (B, H, L, D)
    q, k, v, w = (torch.from_numpy(a).transpose(1, 2).contiguous().to(tdtype)
                  for a in (*arrays, w))
    mask = None if bias is None else torch.from_numpy(bias).to(tdtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            sdpa(q, k, v, attn_mask=mask, scale=scale)

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        (sdpa(*leaves, attn_mask=mask, scale=scale) * w).sum().backward()

    return timed(forward, runs), timed(forward_backward, runs) if backward else []


def jax_times(impl, arrays, w, bias, scale, dtype, runs, backward):
    import jax
    import jax.numpy as jnp

    from unialign_jax.models import attention

    if impl == "einsum":
        def attend(q, k, v, b):
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
            s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (scale or q.shape[-1] ** -0.5)
            p = jax.nn.softmax(s if b is None else s + b, axis=-1)
            return jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3)
    else:
        def attend(q, k, v, b):
            return attention.dot_product_attention(q, k, v, implementation=impl, bias=b,
                                                   scale=scale)

    q, k, v, w = (jnp.asarray(a, dtype) for a in (*arrays, w))
    b = None if bias is None else jnp.asarray(bias, dtype)
    forward = jax.jit(attend)
    grads = jax.jit(jax.grad(lambda q, k, v, b: (attend(q, k, v, b).astype(jnp.float32)
                                                 * w).sum(), argnums=(0, 1, 2)))
    return (timed(lambda: forward(q, k, v, b).block_until_ready(), runs),
            timed(lambda: jax.block_until_ready(grads(q, k, v, b)), runs) if backward else [])


def cell(times, reference=None) -> str:
    if not times:
        return "-"
    med = statistics.median(times)
    ratio = "" if reference is None else f" {med / statistics.median(reference):5.2f}x"
    return f"{med:9.1f} ({min(times):.1f}-{max(times):.1f}){ratio}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxHxLxD ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--runs", type=int, default=7, help="timed calls per cell (after a warm-up)")
    p.add_argument("--bias", action="store_true",
                   help="add a (1, H, L, L) bias and use scale 1, like T5")
    p.add_argument("--impls", nargs="+", default=None,
                   help="implementations to time (default: all this backend runs, + einsum)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    args = p.parse_args(argv)

    import jax

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
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, dtype {args.dtype}, "
          f"bias {args.bias}, 'auto' -> {attention.resolve_implementation(bias=args.bias)}, "
          f"median (min-max) ms of {args.runs} runs, ratio to torch")
    print(f"{'shape BxHxLxD':16s} {'impl':10s} {'forward':>32s} {'forward+backward':>32s}")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        b, h, length, d = map(int, shape.split("x"))
        arrays = [rng.standard_normal((b, length, h, d), np.float32) for _ in range(3)]
        w = rng.standard_normal((b, length, h, d), np.float32)
        bias = rng.standard_normal((1, h, length, length), np.float32) if args.bias else None
        scale = 1.0 if args.bias else None
        timing = (arrays, w, bias, scale, args.dtype, args.runs, not args.no_backward)
        ref_f, ref_b = torch_times(*timing)
        print(f"{shape:16s} {'torch':10s} {cell(ref_f):>32s} {cell(ref_b):>32s}", flush=True)
        for impl in impls:
            fwd, fwd_bwd = jax_times(impl, *timing)
            print(f"{shape:16s} {impl:10s} {cell(fwd, ref_f):>32s} {cell(fwd_bwd, ref_b):>32s}",
                  flush=True)


if __name__ == "__main__":
    main()
