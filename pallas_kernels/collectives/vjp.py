"""The custom VJP that pairs the two collective matmuls, written once for every
implementation (the ``shard_map`` ring of :mod:`~pallas_kernels.collectives.matmul`, the
Pallas TPU kernels of :mod:`~pallas_kernels.collectives.tpu`).

The gradient of one is the other. For ``ys = all_gather_matmul(x, ws)``:
``dx = matmul_reduce_scatter(dys, ws^T)`` (one ring summing ``dy_i @ w_i^T``) and
``dw_i = all_gather(x)^T dy_i``, for which ``x`` travels the ring again: the forward saves
this device's rows, not the gathered ones (Megatron-SP), so what a sequence-parallel layer
keeps for backward falls with the ring size. For ``y = matmul_reduce_scatter(x, w)``: one
ring of ``dy`` gives ``dx = all_gather(dy) @ w^T`` and ``dw^T = all_gather(dy)^T x``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

GatherMatmul = Callable[..., tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]]
"""``(x, ws, grams_with, axis_name, option) -> ((all_gather(x) @ w for w in ws),
(all_gather(x)^T g for g in grams_with))``: ``x: [..., m, k]``, each ``g: [..., n m, f]``, each
gram ``[k, f]`` float32 (contracted over every dim but the last)."""
MatmulScatter = Callable[..., jax.Array]
"""``(xs, ws, axis_name, option) -> psum_scatter(sum_i xs[i] @ ws[i])``."""


def gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^T b`` over every dim but the last: a ``[..., k]``, b ``[..., f]`` -> ``[k, f]``
    float32."""
    lead = tuple(range(a.ndim - 1))
    return lax.dot_general(a, b, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)


def paired(
    gather_matmul: GatherMatmul, matmul_scatter: MatmulScatter
) -> tuple[Callable[..., tuple[jax.Array, ...]], Callable[..., jax.Array]]:
    """``(all_gather_matmul(x, ws, axis_name, option), matmul_reduce_scatter(x, w, axis_name,
    option))`` with the VJPs of the module doc, from one implementation's two ring
    functions; ``option`` is the implementation's static setting (ring direction, TPU
    interpret parameters), passed through to them."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def all_gather_matmul(x, ws, axis_name: str, option: Any):
        return gather_matmul(x, ws, (), axis_name, option)[0]

    def all_gather_matmul_fwd(x, ws, axis_name, option):
        return gather_matmul(x, ws, (), axis_name, option)[0], (x, ws)

    def all_gather_matmul_bwd(axis_name, option, residuals, dys):
        x, ws = residuals
        w_ts = tuple(w.T for w in ws)
        dx = matmul_scatter(dys, w_ts, axis_name, option).astype(x.dtype)
        _, dws = gather_matmul(x, (), dys, axis_name, option)
        return dx, tuple(dw.astype(w.dtype) for dw, w in zip(dws, ws, strict=True))

    all_gather_matmul.defvjp(all_gather_matmul_fwd, all_gather_matmul_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def matmul_reduce_scatter(x, w, axis_name: str, option: Any):
        return matmul_scatter((x,), (w,), axis_name, option)

    def matmul_reduce_scatter_fwd(x, w, axis_name, option):
        return matmul_scatter((x,), (w,), axis_name, option), (x, w)

    def matmul_reduce_scatter_bwd(axis_name, option, residuals, dy):
        x, w = residuals
        (dx,), (dw_t,) = gather_matmul(dy, (w.T,), (x,), axis_name, option)
        return dx.astype(x.dtype), dw_t.T.astype(w.dtype)

    matmul_reduce_scatter.defvjp(matmul_reduce_scatter_fwd, matmul_reduce_scatter_bwd)
    return all_gather_matmul, matmul_reduce_scatter
