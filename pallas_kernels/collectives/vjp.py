"""The custom VJP that pairs the two collective matmuls, written once for every
implementation (the ``shard_map`` ring of :mod:`~pallas_kernels.collectives.matmul`, the
Pallas TPU kernels of :mod:`~pallas_kernels.collectives.tpu`).

The gradient of one is the other. For ``ys = all_gather_matmul(x, ws)``:
``dx = matmul_reduce_scatter(dys, ws^T)`` (one ring summing ``dy_i @ w_i^T``) and
``dw_i = x_gathered^T dy_i`` (the forward keeps the gathered ``x`` it assembled anyway); for
``y = matmul_reduce_scatter(x, w)``: ``dx, dy_gathered = all_gather_matmul(dy, w^T)`` and
``dw = x^T dy_gathered``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

GatherMatmul = Callable[..., tuple[tuple[jax.Array, ...], jax.Array]]
"""``(x, ws, axis_name, option) -> ((all_gather(x) @ w for w in ws), all_gather(x))``."""
MatmulScatter = Callable[..., jax.Array]
"""``(xs, ws, axis_name, option) -> psum_scatter(sum_i xs[i] @ ws[i])``."""


def weight_grad(x: jax.Array, dy: jax.Array, w: jax.Array) -> jax.Array:
    """``x^T dy`` over every dim but the last: x ``[..., k]``, dy ``[..., f]`` -> ``[k, f]``,
    accumulated in float32 and returned in ``w``'s dtype."""
    lead = tuple(range(x.ndim - 1))
    dw = lax.dot_general(x, dy, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dw.astype(w.dtype)


def paired(
    gather_matmul: GatherMatmul, matmul_scatter: MatmulScatter
) -> tuple[Callable[..., tuple[jax.Array, ...]], Callable[..., jax.Array]]:
    """``(all_gather_matmul(x, ws, axis_name, option), matmul_reduce_scatter(x, w, axis_name,
    option))`` with the VJPs of the module doc, from one implementation's two ring
    functions; ``option`` is the implementation's static setting (ring direction, TPU
    interpret parameters), passed through to them."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def all_gather_matmul(x, ws, axis_name: str, option: Any):
        return gather_matmul(x, ws, axis_name, option)[0]

    def all_gather_matmul_fwd(x, ws, axis_name, option):
        ys, gathered = gather_matmul(x, ws, axis_name, option)
        return ys, (gathered, ws)

    def all_gather_matmul_bwd(axis_name, option, residuals, dys):
        gathered, ws = residuals
        w_ts = tuple(w.T for w in ws)
        dx = matmul_scatter(dys, w_ts, axis_name, option).astype(gathered.dtype)
        return dx, tuple(weight_grad(gathered, dy, w) for dy, w in zip(dys, ws, strict=True))

    all_gather_matmul.defvjp(all_gather_matmul_fwd, all_gather_matmul_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def matmul_reduce_scatter(x, w, axis_name: str, option: Any):
        return matmul_scatter((x,), (w,), axis_name, option)

    def matmul_reduce_scatter_fwd(x, w, axis_name, option):
        return matmul_scatter((x,), (w,), axis_name, option), (x, w)

    def matmul_reduce_scatter_bwd(axis_name, option, residuals, dy):
        x, w = residuals
        (dx,), dy_gathered = gather_matmul(dy, (w.T,), axis_name, option)
        return dx.astype(x.dtype), weight_grad(x, dy_gathered, w)

    matmul_reduce_scatter.defvjp(matmul_reduce_scatter_fwd, matmul_reduce_scatter_bwd)
    return all_gather_matmul, matmul_reduce_scatter
