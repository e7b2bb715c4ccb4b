"""Scaled dot-product attention with a kernel chosen per backend.

`dot_product_attention(q, k, v)` takes `(B, L, H, D)` arrays like `jax.nn.dot_product_attention`
and runs one of `IMPLEMENTATIONS`:

* "xla": `jax.nn.dot_product_attention(implementation="xla")`, the reference; runs anywhere.
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, fused flash attention on
  NVIDIA GPUs. JAX's cuDNN path takes the additive bias itself; it needs fp16/bf16 inputs, so
  "auto" picks it only for those.
* "splash": the Pallas TPU splash-attention kernel (`splash_attention`). It has no additive
  bias, so biased calls (T5's relative positions) resolve "auto" to "xla".
* "blockwise": pure-JAX memory-efficient attention (`blockwise_attention`), tuned so that
  XLA:CPU beats the unfused "xla" path several times over; it is "auto" on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blockwise")
_NVIDIA = ("gpu", "cuda")
_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def resolve_implementation(implementation: str = "auto", backend: str | None = None, *,
                           bias: bool = False, dtype=None) -> str:
    """The concrete kernel for `implementation` on `backend` (default: JAX's default backend).

    "auto" -> "cudnn" on an NVIDIA GPU (fp16/bf16 inputs, else "xla"), "splash" on TPU ("xla"
    when there is a `bias`), "blockwise" on CPU (measured fastest: scripts/bench_attention.py),
    "xla" elsewhere. Explicit names are checked against the backend so that a config asking for
    a kernel the machine lacks fails at once instead of deep inside tracing.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    backend = (backend or jax.default_backend()).lower()
    if implementation == "auto":
        if backend in _NVIDIA:
            return "cudnn" if dtype is None or jnp.dtype(dtype) in _HALF else "xla"
        if backend == "tpu":
            return "xla" if bias else "splash"
        return "blockwise" if backend == "cpu" else "xla"
    if implementation == "cudnn" and backend not in _NVIDIA:
        raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU backend "
                         f"('gpu'), not {backend!r}; use 'auto'")
    if implementation == "splash":
        if backend != "tpu":
            raise ValueError(f"attention implementation 'splash' needs a TPU backend, not "
                             f"{backend!r}; use 'auto'")
        if bias:
            raise ValueError("attention implementation 'splash' takes no additive bias; "
                             "use 'xla' (or 'auto') for biased attention such as T5's")
    return implementation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str = "auto", bias: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
    """softmax(q kᵀ · scale + bias) v for `(B, L, H, D)` inputs; returns `(B, Lq, H, D)`.

    `bias` is an optional additive `(1|B, H, Lq, Lk)` float bias; `scale` defaults to D^-1/2.
    No masks: the models attend over every token.
    """
    impl = resolve_implementation(implementation, bias=bias is not None, dtype=q.dtype)
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                            implementation=impl)
    if impl == "splash":
        return splash_attention(q, k, v, scale=scale)
    return blockwise_attention(q, k, v, bias=bias, scale=scale)


# --------------------------------------------------------------------------------------------
# splash (TPU)

def _splash_block(length: int) -> tuple[int, int]:
    """(padded length, block): lengths pad to a multiple of 128 (the TPU lane width), then the
    largest of 512/256/128 dividing it, so 1280 and 4352 tokens need no extra padding."""
    padded = -(-length // 128) * 128
    return padded, next(b for b in (512, 256, 128) if padded % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)

    (_, bq), (_, bk) = _splash_block(lq), _splash_block(lk)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                               block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                               use_fused_bwd_kernel=True)
    mask = masks.MultiHeadMask([masks.FullMask((lq, lk))] * heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     interpret: bool = False) -> jax.Array:
    """TPU splash attention for `(B, L, H, D)` inputs of any length.

    The kernel wants heads-major `(H, L, D)` per example, lengths that its blocks divide and q
    already scaled. Lengths are padded up to the block grid; padded keys get segment id 1 while
    every query has segment id 0, so no real query sees them (padded queries see only real keys,
    stay finite and are cut off). `interpret=True` runs the Pallas kernel in interpret mode on
    any backend, which is how the CPU tests check this wrapper against the reference.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

    b, lq, h, d = q.shape
    lk = k.shape[1]
    (pq, _), (pk, _) = _splash_block(lq), _splash_block(lk)
    scale = d ** -0.5 if scale is None else scale

    def heads_major(t, padded):
        t = jnp.pad(t, ((0, 0), (0, padded - t.shape[1]), (0, 0), (0, 0)))
        return t.transpose(0, 2, 1, 3)

    segments = None
    if pk != lk:
        segments = splash_attention_kernel.SegmentIds(
            q=jnp.zeros(pq, jnp.int32), kv=(jnp.arange(pk) >= lk).astype(jnp.int32))
    kernel = _splash_kernel(h, pq, pk, interpret)
    out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=segments))(
        heads_major(q * jnp.asarray(scale, q.dtype), pq), heads_major(k, pk), heads_major(v, pk))
    return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)


# --------------------------------------------------------------------------------------------
# blockwise (CPU)

# Score elements per loop step. On XLA:CPU every op in a loop body costs tens of microseconds
# of dispatch, so big tiles (16 MiB of f32 scores, still in the shared L3) beat cache-sized
# ones; see scripts/bench_attention.py.
_TILE = 1 << 22
_MAX_KV = 2048


def _split(length: int, max_block: int) -> tuple[int, int]:
    """(number of blocks, block size) covering `length` with as little padding as possible."""
    n = -(-length // max(1, min(max_block, length)))
    return n, -(-length // n)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        bias: jax.Array | None = None, scale: float | None = None,
                        block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Memory-efficient attention: online softmax over key blocks, queries in blocks.

    Heads are folded into the batch (heads-major, so every tile is a plain batched matmul) and
    a loop runs over groups of heads and query blocks, with an inner loop over key blocks;
    scores only ever exist one tile at a time, in float32. Lengths that the blocks do not divide
    are zero-padded and padded keys masked. The gradient is a custom VJP that recomputes the
    tiles from the saved log-sum-exp (flash-attention style), so training memory stays linear
    in the sequence length too. A `bias` is broadcast to `(B, H, Lq, Lk)` first (T5: short).
    `block_q`/`block_kv` override the measured defaults (tests use small ones).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    nk, bk = _split(lk, block_kv or _MAX_KV)
    nq, bq = _split(lq, block_q or max(1, _TILE // bk))
    group = max(g for g in range(1, b * h + 1) if (b * h) % g == 0
                and (g == 1 or g * bq * bk <= _TILE))

    def heads_major(t, blocks, size):
        t = t.transpose(0, 2, 1, 3).reshape(b * h, t.shape[1], t.shape[3])
        return jnp.pad(t, ((0, 0), (0, blocks * size - t.shape[1]), (0, 0)))

    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, h, lq, lk)).reshape(b * h, lq, lk)
        bias = jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, nq * bq - lq), (0, nk * bk - lk)))
    out = _attention(heads_major(q * jnp.asarray(scale, q.dtype), nq, bq), heads_major(k, nk, bk),
                     heads_major(v, nk, bk), bias, (group, bq, bk, lk))
    return out[:, :lq].reshape(b, h, lq, -1).transpose(0, 2, 1, 3)


def _tiles(q, k, v, bias, plan):
    """Group-of-heads views and per-tile helpers shared by the forward and backward loops."""
    group, bq, bk, lk = plan
    n, lq_pad, _ = q.shape
    nq, nk = lq_pad // bq, k.shape[1] // bk
    grouped = [None if t is None else t.reshape(n // group, group, *t.shape[1:])
               for t in (q, k, v, bias)]

    def scores(qb, kb, bias_g, i, j):
        """float32 scores of query block i against key block j, padded keys at -inf."""
        s = jnp.einsum("hqd,hkd->hqk", qb, kb, preferred_element_type=jnp.float32)
        if bias_g is not None:
            s += jax.lax.dynamic_slice(bias_g, (0, i * bq, j * bk), (group, bq, bk))
        if nk * bk != lk:
            s = jnp.where(j * bk + jnp.arange(bk) < lk, s, -jnp.inf)
        return s

    return grouped, nq, nk, scores


def _block(t, i, size):
    return jax.lax.dynamic_slice_in_dim(t, i * size, size, axis=1)


def _loop(body, carry, n):
    """`lax.scan` over block indices, unrolled when there is one block (no while loop)."""
    return jax.lax.scan(body, carry, jnp.arange(n), unroll=n == 1)


def _ungroup(blocks):
    """(G, blocks, group, size, ...) stacked loop outputs -> (G*group, blocks*size, ...)."""
    g, nblk, group, size = blocks.shape[:4]
    blocks = jnp.moveaxis(blocks, 2, 1)
    return blocks.reshape(g * group, nblk * size, *blocks.shape[4:])


def _forward(q, k, v, bias, plan):
    group, bq, bk, _ = plan
    (qg, kg, vg, biasg), nq, nk, scores = _tiles(q, k, v, bias, plan)

    def per_group(args):
        q_g, k_g, v_g, bias_g = args

        def per_q_block(_, i):
            qb = _block(q_g, i, bq)

            def per_kv_block(carry, j):
                m, l, acc = carry
                s = scores(qb, _block(k_g, j, bk), bias_g, i, j)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                rescale = jnp.exp(m - m_new)
                pv = jnp.einsum("hqk,hkd->hqd", p.astype(v.dtype), _block(v_g, j, bk),
                                preferred_element_type=jnp.float32)
                return (m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

            stats = jnp.full((group, bq), -jnp.inf, jnp.float32), jnp.zeros((group, bq), jnp.float32)
            (m, l, acc), _ = _loop(per_kv_block, (*stats, jnp.zeros((group, bq, v.shape[2]),
                                                                    jnp.float32)), nk)
            return None, ((acc / l[..., None]).astype(q.dtype), m + jnp.log(l))

        return _loop(per_q_block, None, nq)[1]

    out, lse = jax.lax.map(per_group, (qg, kg, vg, biasg))
    return _ungroup(out), _ungroup(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, bias, plan):
    """(N, Lq, D) x (N, Lk, D) x (N, Lk, Dv) heads-major attention, q pre-scaled, lengths
    padded to the blocks of `plan` = (heads per step, block_q, block_kv, true Lk)."""
    return _forward(q, k, v, bias, plan)[0]


def _attention_fwd(q, k, v, bias, plan):
    out, lse = _forward(q, k, v, bias, plan)
    return out, (q, k, v, bias, out, lse)


def _attention_bwd(plan, residuals, d_out):
    q, k, v, bias, out, lse = residuals
    group, bq, bk, _ = plan
    (qg, kg, vg, biasg), nq, nk, scores = _tiles(q, k, v, bias, plan)
    grouped = lambda t: t.reshape(t.shape[0] // group, group, *t.shape[1:])  # noqa: E731
    # dk and dv come out transposed, (D, Lk) = (D, Lq) @ (Lq, Lk): XLA:CPU runs that matmul
    # about twice as fast as the (Lq, Lk)ᵀ @ (Lq, D) it would otherwise be.
    t_grouped = lambda t: grouped(jnp.swapaxes(t, 1, 2))  # noqa: E731

    def per_group(args):
        q_g, qt_g, k_g, v_g, bias_g, do_g, dot_g, out_g, lse_g = args
        delta_g = (do_g.astype(jnp.float32) * out_g.astype(jnp.float32)).sum(-1)  # rowsum(dO O)

        def per_q_block(carry, i):
            qb, dob = _block(q_g, i, bq), _block(do_g, i, bq)
            qtb, dotb = (jax.lax.dynamic_slice_in_dim(t, i * bq, bq, axis=2) for t in (qt_g, dot_g))
            lse_b, delta_b = _block(lse_g, i, bq)[..., None], _block(delta_g, i, bq)[..., None]

            def per_kv_block(dq, j):
                kb, vb = _block(k_g, j, bk), _block(v_g, j, bk)
                p = jnp.exp(scores(qb, kb, bias_g, i, j) - lse_b)
                dv_t = jnp.einsum("hdq,hqk->hdk", dotb, p.astype(dotb.dtype),
                                  preferred_element_type=jnp.float32)
                dp = jnp.einsum("hqd,hkd->hqk", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_b)
                dq += jnp.einsum("hqk,hkd->hqd", ds.astype(kb.dtype), kb,
                                 preferred_element_type=jnp.float32)
                dk_t = jnp.einsum("hdq,hqk->hdk", qtb, ds.astype(qtb.dtype),
                                  preferred_element_type=jnp.float32)
                return dq, (dk_t, dv_t, None if bias is None else ds)

            dq, (dk_t, dv_t, dbias) = _loop(per_kv_block, jnp.zeros(qb.shape, jnp.float32), nk)
            return (carry[0] + dk_t, carry[1] + dv_t), (dq, dbias)

        zeros = (jnp.zeros((nk, group, k.shape[2], bk), jnp.float32),
                 jnp.zeros((nk, group, v.shape[2], bk), jnp.float32))
        (dk_t, dv_t), (dq, dbias) = _loop(per_q_block, zeros, nq)
        return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2), dbias

    dq, dk, dv, dbias = jax.lax.map(per_group, (qg, t_grouped(q), kg, vg, biasg, grouped(d_out),
                                                t_grouped(d_out), grouped(out), grouped(lse)))
    if dbias is not None:  # (G, nq, nk, group, bq, bk) -> (N, Lq, Lk)
        dbias = dbias.transpose(0, 3, 1, 4, 2, 5).reshape(bias.shape)
    return (_ungroup(dq).astype(q.dtype), _ungroup(dk).astype(k.dtype),
            _ungroup(dv).astype(v.dtype), dbias)


_attention.defvjp(_attention_fwd, _attention_bwd)
