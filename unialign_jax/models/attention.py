"""Scaled dot-product attention with a kernel chosen per backend.

`dot_product_attention(q, k, v)` takes `(B, L, H, D)` arrays like `jax.nn.dot_product_attention`
and runs one of `IMPLEMENTATIONS`:

* "xla": `jax.nn.dot_product_attention(implementation="xla")`, the reference; runs anywhere.
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, fused flash attention on
  NVIDIA GPUs. JAX's cuDNN path takes the additive bias itself; it needs fp16/bf16 inputs, so
  "auto" picks it only for those.
* "splash": the Pallas TPU splash-attention kernel (`splash_attention`). It has no additive
  bias, so biased calls (T5's relative positions) resolve "auto" to "xla". A Mosaic call
  cannot be split by XLA's partitioner, so on a mesh it runs under `shard_map`: each device
  attends over its own rows and heads.
* "blockwise": pure-JAX memory-efficient attention (`blockwise_attention`), tuned so that
  XLA:CPU beats the unfused "xla" path several times over; it is "auto" on CPU.

The kernel is chosen for the platform of the devices the computation runs on: the mesh of
the caller's activation sharding (`layers.Shard`) when it has one, so that compiling for a
TPU topology from a CPU host picks what the TPU run picks; JAX's default backend otherwise.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from unialign_jax.models import layers

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blockwise")
_NVIDIA = ("gpu", "cuda")
_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

log = logging.getLogger(__name__)


# cuDNN's fused attention takes head dimensions up to this (the VAE's single 512-wide head
# does not fit).
CUDNN_MAX_HEAD_DIM = 128


def resolve_implementation(attention: str = "auto", backend: str | None = None, *,
                           bias: bool = False, dtype=None, head_dim: int | None = None) -> str:
    """The concrete kernel for `attention` on `backend` (default: JAX's default backend).

    "auto" -> "cudnn" on an NVIDIA GPU (fp16/bf16 inputs and head_dim ≤ 128, else "xla"),
    "splash" on TPU ("xla" when there is a `bias`), "blockwise" on CPU (measured fastest:
    scripts/bench_attention.py), "xla" elsewhere. Explicit names are checked against the backend so that a config asking for
    a kernel the machine lacks fails at once instead of deep inside tracing.
    """
    if attention not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {attention!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    backend = (backend or jax.default_backend()).lower()
    if attention == "auto":
        if backend in _NVIDIA:
            fits = head_dim is None or head_dim <= CUDNN_MAX_HEAD_DIM
            return "cudnn" if fits and (dtype is None or jnp.dtype(dtype) in _HALF) else "xla"
        if backend == "tpu":
            return "xla" if bias else "splash"
        return "blockwise" if backend == "cpu" else "xla"
    if attention == "cudnn" and backend not in _NVIDIA:
        raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU backend "
                         f"('gpu'), not {backend!r}; use 'auto'")
    if attention == "splash":
        if backend != "tpu":
            raise ValueError(f"attention implementation 'splash' needs a TPU backend, not "
                             f"{backend!r}; use 'auto'")
        if bias:
            raise ValueError("attention implementation 'splash' takes no additive bias; "
                             "use 'xla' (or 'auto') for biased attention such as T5's")
    return attention


def platform(shard: layers.Shard = layers.unsharded) -> str:
    """The platform the computation runs on: that of `shard`'s mesh devices when it has a
    mesh (a TPU topology's abstract devices say "tpu" on any host), else JAX's default
    backend."""
    mesh = shard.mesh
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          attention: str = "auto", bias: jax.Array | None = None,
                          scale: float | None = None,
                          shard: layers.Shard = layers.unsharded) -> jax.Array:
    """softmax(q kᵀ · scale + bias) v for `(B, L, H, D)` inputs; returns `(B, Lq, H, D)`.

    `bias` is an optional additive `(1|B, H, Lq, Lk)` float bias; `scale` defaults to D^-1/2.
    `shard`: the caller's activation sharding; its mesh picks the kernel's platform and
    splits the splash kernel. No masks: the models attend over every token.
    """
    impl = resolve_implementation(attention, platform(shard), bias=bias is not None,
                                  dtype=q.dtype, head_dim=q.shape[-1])
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                            implementation=impl)
    if impl == "splash":
        return splash_attention(q, k, v, scale=scale, shard=shard)
    return blockwise_attention(q, k, v, bias=bias, scale=scale)


# --------------------------------------------------------------------------------------------
# splash (TPU)

def _splash_block(length: int) -> tuple[int, int]:
    """(padded length, block): lengths pad to a multiple of 128 (the TPU lane width), then the
    largest of 512/256/128 dividing it, so 1280 and 4352 tokens need no extra padding."""
    padded = -(-length // 128) * 128
    return padded, next(b for b in (512, 256, 128) if padded % b == 0)


def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    """Built per trace: the kernel holds mask-info arrays, which must not outlive a trace."""
    (_, bq), (_, bk) = _splash_block(lq), _splash_block(lk)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                               block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                               use_fused_bwd_kernel=True)
    mask = splash.MultiHeadMask([splash.FullMask((lq, lk))] * heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     interpret: bool = False, shard: layers.Shard = layers.unsharded
                     ) -> jax.Array:
    """TPU splash attention for `(B, L, H, D)` inputs of any length, on `shard`'s mesh.

    XLA cannot partition a Mosaic call, so on a mesh of several devices the kernel runs
    under `shard_map` with the placement the rules give these activations (batch over
    data × fsdp, heads over tensor): each device attends over its own rows and heads. A
    batch or head count that its mesh axes do not divide stays whole there (the rules'
    fallback): those devices then repeat each other's work, which is correct but wasted,
    and is logged. Lengths are never split (attention needs every key).
    `interpret=True` runs the Pallas kernel in interpret mode on any backend, which is how
    the CPU tests check this wrapper, sharded or not, against the reference.
    """
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    mesh = shard.mesh
    if mesh is None or mesh.size == 1:
        return local(q, k, v)
    q_spec, kv_spec = (_per_shard_spec(shard, t.shape) for t in (q, k))
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v)


def _per_shard_spec(shard: layers.Shard, shape: tuple[int, ...]) -> P:
    """The rules' placement of a (B, L, H, D) activation, length and head width whole."""
    batch, _, heads, _ = (tuple(shard.spec(layers.HEADS, shape)) + (None,) * 4)[:4]
    used = {a for axes in (batch, heads) if axes is not None
            for a in ((axes,) if isinstance(axes, str) else axes)}
    idle = [a for a, n in shard.mesh.shape.items() if n > 1 and a not in used]
    if idle:
        log.info("splash attention on %s: mesh axes %s divide neither its rows nor its "
                 "heads, so the devices along them repeat the same work", shape, idle)
    return P(batch, None, heads, None)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None,
                  interpret: bool) -> jax.Array:
    """Splash attention on one device's arrays.

    The kernel wants heads-major `(H, L, D)` per example, lengths that its blocks divide and q
    already scaled. Lengths are padded up to the block grid; padded keys get segment id 1 while
    every query has segment id 0, so no real query sees them (padded queries see only real keys,
    stay finite and are cut off).
    """
    _, lq, h, d = q.shape
    lk = k.shape[1]
    (pq, _), (pk, _) = _splash_block(lq), _splash_block(lk)
    scale = d ** -0.5 if scale is None else scale

    def heads_major(t, padded):
        t = jnp.pad(t, ((0, 0), (0, padded - t.shape[1]), (0, 0), (0, 0)))
        return t.transpose(0, 2, 1, 3)

    segments = None
    if pk != lk:
        segments = splash.SegmentIds(
            q=jnp.zeros(pq, jnp.int32), kv=(jnp.arange(pk) >= lk).astype(jnp.int32))
    kernel = _splash_kernel(h, pq, pk, interpret)
    out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=segments))(
        heads_major(q * jnp.asarray(scale, q.dtype), pq), heads_major(k, pk), heads_major(v, pk))
    return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)


# --------------------------------------------------------------------------------------------
# blockwise (CPU)

# Score elements per loop step. On XLA:CPU every op in a loop body costs tens of microseconds
# of dispatch, so big tiles (16 MiB of float32 scores, in L3) beat L2-sized ones; see
# scripts/bench_attention.py.
_TILE = 1 << 22
_MAX_KV = 2048


def _split(length: int, max_block: int) -> tuple[int, int]:
    """(number of blocks, block size) covering `length` with blocks of at most `max_block`:
    an exact divisor when one is near (4352 = 4 x 1088), else the least padding."""
    n = -(-length // max(1, min(max_block, length)))
    n = next((m for m in range(n, 2 * n) if length % m == 0), n)
    return n, -(-length // n)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        bias: jax.Array | None = None, scale: float | None = None,
                        block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Memory-efficient attention: online softmax over key blocks, queries in blocks.

    Heads are folded into the batch (heads-major, so every tile is a plain batched matmul); a
    loop runs over groups of heads and query blocks, an inner one over key blocks, and scores
    only ever exist one tile at a time. Everything is computed in float32: on this kind of CPU
    bf16 matmuls are slower than float32 ones. Lengths the blocks do not divide are zero-padded
    and padded keys masked. The gradient is a custom VJP that recomputes the tiles from the
    saved log-sum-exp (flash-attention style), so training memory stays linear in the length.
    A `bias` is broadcast to `(B, H, Lq, Lk)` first (fine for T5's short texts).
    `block_q`/`block_kv` override the measured defaults (the tests use small ones).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    nk, bk = _split(lk, block_kv or _MAX_KV)
    nq, bq = _split(lq, block_q or _TILE // bk)
    group = max(g for g in range(1, b * h + 1)
                if (b * h) % g == 0 and (g == 1 or g * bq * bk <= _TILE))

    def heads_major(t, blocks, size):
        t = t.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h, t.shape[1], t.shape[3])
        return jnp.pad(t, ((0, 0), (0, blocks * size - t.shape[1]), (0, 0)))

    if bias is not None:
        bias = jnp.broadcast_to(bias.astype(jnp.float32), (b, h, lq, lk)).reshape(b * h, lq, lk)
        bias = jnp.pad(bias, ((0, 0), (0, nq * bq - lq), (0, nk * bk - lk)))
    out = _attention(heads_major(q, nq, bq) * scale, heads_major(k, nk, bk),
                     heads_major(v, nk, bk), bias, (group, bq, bk, lk))
    return out[:, :lq].reshape(b, h, lq, -1).transpose(0, 2, 1, 3).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, bias, plan):
    """Heads-major float32 attention: q (N, Lq, D) pre-scaled, k (N, Lk, D), v (N, Lk, Dv),
    bias (N, Lq, Lk) or None; lengths padded to the blocks of
    `plan` = (heads per step, block_q, block_kv, unpadded Lk)."""
    return _forward(q, k, v, bias, plan)[0]


def _loop(body, carry, xs):
    """`lax.scan`, unrolled when there is a single step (no while loop for one block)."""
    return jax.lax.scan(body, carry, xs, unroll=jax.tree.leaves(xs)[0].shape[0] == 1)


def _block(t, i, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(t, i * size, size, axis)


def _grouped(plan, *arrays):
    """(N, ...) -> (N / heads per step, heads per step, ...): the outer loop's steps."""
    return [None if t is None else t.reshape(-1, plan[0], *t.shape[1:]) for t in arrays]


def _ungroup(blocks):
    """(G, blocks, group, size, ...) stacked loop outputs -> (G * group, blocks * size, ...)."""
    g, n, group, size = blocks.shape[:4]
    return jnp.moveaxis(blocks, 2, 1).reshape(g * group, n * size, *blocks.shape[4:])


def _scores(plan, q_blk, k_blk, bias_g, i, j):
    """Scores of query block i against key block j of one group, padded keys at -inf."""
    group, bq, bk, lk = plan
    s = jnp.einsum("hqd,hkd->hqk", q_blk, k_blk)
    if bias_g is not None:
        s += jax.lax.dynamic_slice(bias_g, (0, i * bq, j * bk), (group, bq, bk))
    if lk % bk:  # the last key block is partly padding
        s = jnp.where(j * bk + jnp.arange(bk) < lk, s, -jnp.inf)
    return s


def _forward(q, k, v, bias, plan):
    group, bq, bk, _ = plan
    nq, nk = q.shape[1] // bq, k.shape[1] // bk

    def per_group(_, args):
        q_g, k_g, v_g, bias_g = args

        def per_q_block(_, i):
            q_blk = _block(q_g, i, bq)

            def per_kv_block(carry, j):
                m, l, acc = carry
                s = _scores(plan, q_blk, _block(k_g, j, bk), bias_g, i, j)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                rescale = jnp.exp(m - m_new)
                acc = acc * rescale[..., None] + jnp.einsum("hqk,hkd->hqd", p, _block(v_g, j, bk))
                return (m_new, l * rescale + p.sum(-1), acc), None

            init = (jnp.full((group, bq), -jnp.inf), jnp.zeros((group, bq)),
                    jnp.zeros((group, bq, v.shape[2])))
            (m, l, acc), _ = _loop(per_kv_block, init, jnp.arange(nk))
            return None, (acc / l[..., None], m + jnp.log(l))

        return None, _loop(per_q_block, None, jnp.arange(nq))[1]

    out, lse = _loop(per_group, None, _grouped(plan, q, k, v, bias))[1]
    return _ungroup(out), _ungroup(lse)


def _attention_fwd(q, k, v, bias, plan):
    out, lse = _forward(q, k, v, bias, plan)
    return out, (q, k, v, bias, out, lse)


def _attention_bwd(plan, residuals, d_out):
    q, k, v, bias, out, lse = residuals
    group, bq, bk, _ = plan
    nq, nk = q.shape[1] // bq, k.shape[1] // bk
    delta = (d_out * out).sum(-1)  # rowsum(dO * O); as an einsum XLA:CPU makes it a slow matvec

    def per_group(_, args):
        q_g, q_t, k_g, v_g, bias_g, do_g, do_t, lse_g, delta_g = args

        def per_q_block(carry, i):
            q_blk, do_blk = _block(q_g, i, bq), _block(do_g, i, bq)
            q_blk_t, do_blk_t = _block(q_t, i, bq, axis=2), _block(do_t, i, bq, axis=2)
            lse_blk, delta_blk = _block(lse_g, i, bq)[..., None], _block(delta_g, i, bq)[..., None]

            def per_kv_block(dq, j):
                k_blk, v_blk = _block(k_g, j, bk), _block(v_g, j, bk)
                p = jnp.exp(_scores(plan, q_blk, k_blk, bias_g, i, j) - lse_blk)
                ds = p * (jnp.einsum("hqd,hkd->hqk", do_blk, v_blk) - delta_blk)
                dq += jnp.einsum("hqk,hkd->hqd", ds, k_blk)
                # dk, dv as (D, Lq) @ (Lq, Lk): XLA:CPU runs that about twice as fast as the
                # (Lq, Lk)ᵀ @ (Lq, D) form
                dk_t = jnp.einsum("hdq,hqk->hdk", q_blk_t, ds)
                dv_t = jnp.einsum("hdq,hqk->hdk", do_blk_t, p)
                return dq, (dk_t, dv_t, None if bias_g is None else ds)

            dq, (dk_t, dv_t, dbias) = _loop(per_kv_block, jnp.zeros(q_blk.shape), jnp.arange(nk))
            return (carry[0] + dk_t, carry[1] + dv_t), (dq, dbias)

        init = (jnp.zeros((nk, group, k.shape[2], bk)), jnp.zeros((nk, group, v.shape[2], bk)))
        (dk_t, dv_t), (dq, dbias) = _loop(per_q_block, init, jnp.arange(nq))
        return None, (dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2), dbias)

    q_t, do_t = jnp.swapaxes(q, 1, 2), jnp.swapaxes(d_out, 1, 2)
    dq, dk, dv, dbias = _loop(per_group, None, _grouped(plan, q, q_t, k, v, bias, d_out, do_t,
                                                         lse, delta))[1]
    if dbias is not None:  # (G, nq, nk, group, bq, bk) -> (N, Lq, Lk)
        dbias = dbias.transpose(0, 3, 1, 4, 2, 5).reshape(bias.shape)
    return _ungroup(dq), _ungroup(dk), _ungroup(dv), dbias


_attention.defvjp(_attention_fwd, _attention_bwd)
