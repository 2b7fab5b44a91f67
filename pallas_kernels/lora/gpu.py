"""Batched gathered LoRA matmul (Punica's BGMV) as a Pallas Triton kernel.

One program per (token, block of output columns)::

    i = adapter_idx[t]                                 (-1: no adapter, writes zeros)
    h[r]   = sum_k x[t, k] * A[i, k, r]                over d_in in blocks of block_k
    out[t, cols] = scale[i] * sum_r h[r] * B[i, r, cols]

``x: [t, d_in]``, ``A: [n, d_in, r]``, ``B: [n, r, d_out]``. Each token reads only its own
adapter, so tokens of different adapters (and none) share one launch. The products are
matrix-vector, so the kernel multiplies and sums in registers instead of calling ``tl.dot``
(whose tiles need 16 rows); blocks are powers of two, masked at the edges. Accumulation is
float32; the output is ``x.dtype``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _bgmv_kernel(idx_ref, scale_ref, x_ref, a_ref, b_ref, out_ref, *, block_k, block_r, block_n):
    # idx_ref: [t]  scale_ref: [n]  x_ref: [t, d_in]  a_ref: [n, d_in, r]  b_ref: [n, r, d_out]
    # out_ref: [t, d_out]
    token, col_block = pl.program_id(0), pl.program_id(1)
    d_in, rank = a_ref.shape[1], a_ref.shape[2]
    d_out = b_ref.shape[2]
    adapter = idx_ref[token]
    safe = jnp.maximum(adapter, 0)
    rs = jnp.arange(block_r)
    r_ok = rs < rank

    def k_body(kk, h):
        ks = kk * block_k + jnp.arange(block_k)
        k_ok = ks < d_in
        x = plgpu.load(x_ref.at[token, pl.ds(kk * block_k, block_k)], mask=k_ok, other=0.0)
        a = plgpu.load(a_ref.at[safe, pl.ds(kk * block_k, block_k), pl.ds(0, block_r)],
                       mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
        return h + jnp.sum(x.astype(jnp.float32)[:, None] * a.astype(jnp.float32), axis=0)

    h = lax.fori_loop(0, pl.cdiv(d_in, block_k), k_body, jnp.zeros((block_r,), jnp.float32))
    cols = col_block * block_n + jnp.arange(block_n)
    n_ok = cols < d_out
    b = plgpu.load(b_ref.at[safe, pl.ds(0, block_r), pl.ds(col_block * block_n, block_n)],
                   mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
    out = jnp.sum(h[:, None] * b.astype(jnp.float32), axis=0) * scale_ref[safe]
    out = jnp.where(adapter >= 0, out, 0.0)
    plgpu.store(out_ref.at[token, pl.ds(col_block * block_n, block_n)],
                out.astype(out_ref.dtype), mask=n_ok)  # fmt: skip


def lora_bgmv(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    adapter_idx: jax.Array,
    scale: jax.Array,
    *,
    block_k: int = 128,
    block_n: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """The Triton BGMV (module doc); inputs already validated by the dispatch."""
    (t, d_in), (_, _, rank), d_out = x.shape, a.shape, b.shape[2]
    block_k = min(block_k, pl.next_power_of_2(d_in))
    block_n = min(block_n, pl.next_power_of_2(d_out))
    block_r = pl.next_power_of_2(rank)
    kernel = functools.partial(_bgmv_kernel, block_k=block_k, block_r=block_r, block_n=block_n)
    return pl.pallas_call(
        kernel,
        grid=(t, pl.cdiv(d_out, block_n)),
        out_shape=jax.ShapeDtypeStruct((t, d_out), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="lora_bgmv",
    )(adapter_idx.astype(jnp.int32), scale.astype(jnp.float32), x, a, b)
