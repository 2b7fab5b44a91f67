"""Collective matmuls in ``shard_map`` form: a collective decomposed into ring steps so that
each step's transfer overlaps the matmul of the block already at hand.

Tensor parallelism with sequence-parallel activations (Megatron-SP) enters a column-parallel
layer with an all-gather of the tokens and leaves a row-parallel one with a reduce-scatter.
Written plainly, each device waits for the whole collective before (or after) its matmul.
Here, on a ring of ``n`` devices of ``axis_name`` (Wang et al., "Overlap communication with
dependent computation via decomposition", ASPLOS 2023)::

    all_gather_matmul      x: [..., m, k] (rows split), w: [k, f]  ->  [..., n m, f]
        step t: send the block on; y[rows of device r - t] = block @ w
    matmul_reduce_scatter  x: [..., n m, k], w: [k, f]  ->  [..., m, f] (summed, rows split)
        step t: acc = acc + x[rows of device r - 1 - t] @ w; send acc on (the last stays)

Each step's ``ppermute`` only depends on data of the previous step, so XLA's scheduler
runs it while the step's matmul computes (on GPU/TPU with the flags of
``jaxstack.xla_flags``; XLA:CPU runs collectives synchronously).

Backward: the gradient of one is the other. For ``y = all_gather_matmul(x, w)``:
``dx = matmul_reduce_scatter(dy, w^T)`` and ``dw = x_gathered^T dy`` (the forward keeps the
gathered ``x`` it assembled anyway); for ``y = matmul_reduce_scatter(x, w)``:
``dx, dy_gathered = all_gather_matmul(dy, w^T)`` and ``dw = x^T dy_gathered``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _shift(x: jax.Array, axis_name: str) -> jax.Array:
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


def _check(x: jax.Array, w: jax.Array, name: str) -> None:
    if x.ndim < 2 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{name} takes x [..., rows, k] and w [k, f] with matching k, got x {x.shape} "
            f"and w {w.shape}."
        )


def _gather_matmul(x: jax.Array, w: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """``(all_gather(x) @ w, all_gather(x))`` by ring steps."""
    n, r = lax.axis_size(axis_name), lax.axis_index(axis_name)
    m, axis = x.shape[-2], x.ndim - 2
    y = jnp.zeros((*x.shape[:-2], n * m, w.shape[1]), jnp.result_type(x, w))
    gathered = jnp.zeros((*x.shape[:-2], n * m, x.shape[-1]), x.dtype)
    held = x
    for t in range(n):
        nxt = _shift(held, axis_name) if t < n - 1 else None
        start = ((r - t) % n) * m
        y = lax.dynamic_update_slice_in_dim(y, jnp.matmul(held, w), start, axis)
        gathered = lax.dynamic_update_slice_in_dim(gathered, held, start, axis)
        held = nxt
    return y, gathered


def _matmul_scatter(x: jax.Array, w: jax.Array, axis_name: str) -> jax.Array:
    """``psum_scatter(x @ w)`` by ring steps."""
    n, r = lax.axis_size(axis_name), lax.axis_index(axis_name)
    rows, axis = x.shape[-2], x.ndim - 2
    if rows % n:
        raise ValueError(
            f"matmul_reduce_scatter splits the {rows} rows of x over {n} devices of "
            f"{axis_name!r}; use a row count that is a multiple of {n}."
        )
    m = rows // n
    acc = None
    for t in range(n):
        part = jnp.matmul(lax.dynamic_slice_in_dim(x, ((r - 1 - t) % n) * m, m, axis), w)
        acc = part if acc is None else acc + part
        if t < n - 1:
            acc = _shift(acc, axis_name)
    return acc


def _weight_grad(x: jax.Array, dy: jax.Array, w: jax.Array) -> jax.Array:
    """``x^T dy`` over every dim but the last: x ``[..., k]``, dy ``[..., f]`` -> ``[k, f]``."""
    lead = tuple(range(x.ndim - 1))
    dw = lax.dot_general(x, dy, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _all_gather_matmul(x, w, axis_name):
    return _gather_matmul(x, w, axis_name)[0]


def _all_gather_matmul_fwd(x, w, axis_name):
    y, gathered = _gather_matmul(x, w, axis_name)
    return y, (gathered, w)


def _all_gather_matmul_bwd(axis_name, residuals, dy):
    gathered, w = residuals
    dx = _matmul_scatter(dy, w.T, axis_name).astype(gathered.dtype)
    return dx, _weight_grad(gathered, dy, w)


_all_gather_matmul.defvjp(_all_gather_matmul_fwd, _all_gather_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_reduce_scatter(x, w, axis_name):
    return _matmul_scatter(x, w, axis_name)


def _matmul_reduce_scatter_fwd(x, w, axis_name):
    return _matmul_scatter(x, w, axis_name), (x, w)


def _matmul_reduce_scatter_bwd(axis_name, residuals, dy):
    x, w = residuals
    dx, dy_gathered = _gather_matmul(dy, w.T, axis_name)
    return dx.astype(x.dtype), _weight_grad(x, dy_gathered, w)


_matmul_reduce_scatter.defvjp(_matmul_reduce_scatter_fwd, _matmul_reduce_scatter_bwd)


def all_gather_matmul(x: jax.Array, w: jax.Array, *, axis_name: str) -> jax.Array:
    """``all_gather(x, axis=-2) @ w`` by overlapped ring steps (per-device code).

    Args:
      x: ``[..., m, k]`` this device's rows; the gathered rows are ordered by device index.
      w: ``[k, f]`` this device's weight (e.g. a column-parallel shard).
      axis_name: the mesh axis of the ring (inside ``shard_map``).

    Returns:
      ``[..., n * m, f]``, equal to ``reference.all_gather_matmul_reference``.
    """
    _check(x, w, "all_gather_matmul")
    return _all_gather_matmul(x, w, axis_name)


def matmul_reduce_scatter(x: jax.Array, w: jax.Array, *, axis_name: str) -> jax.Array:
    """``psum_scatter(x @ w, scatter_dimension=-2)`` by overlapped ring steps.

    Args:
      x: ``[..., rows, k]`` (e.g. the activations of a row-parallel layer, ``k`` split).
      w: ``[k, f]`` this device's weight shard.
      axis_name: the mesh axis of the ring; its size must divide ``rows``.

    Returns:
      ``[..., rows / n, f]``: device ``r`` holds rows block ``r`` of the sum over devices.
    """
    _check(x, w, "matmul_reduce_scatter")
    return _matmul_reduce_scatter(x, w, axis_name)
