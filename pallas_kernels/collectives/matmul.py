"""Collective matmuls in ``shard_map`` form: a collective decomposed into ring steps so that
each step's transfer overlaps the matmul of the block already at hand.

Tensor parallelism with sequence-parallel activations (Megatron-SP) enters a column-parallel
layer with an all-gather of the tokens and leaves a row-parallel one with a reduce-scatter.
Written plainly, each device waits for the whole collective before (or after) its matmul.
Here, on a ring of ``n`` devices of ``axis_name`` (Wang et al., "Overlap communication with
dependent computation via decomposition", ASPLOS 2023)::

    all_gather_matmul      x: [..., m, k] (rows split), w: [k, f]  ->  [..., n m, f]
        each step: send the blocks at hand on; y[rows of their devices] = block @ w
    matmul_reduce_scatter  x: [..., n m, k], w: [k, f]  ->  [..., m, f] (summed, rows split)
        each step: acc = received + x[rows of the device acc travels to] @ w; send acc on

Each step's ``ppermute`` only depends on data of the previous step, so XLA's scheduler
runs it while the step's matmul computes (on GPU/TPU with the flags of
``jaxstack.xla_flags``; XLA:CPU runs collectives synchronously).

The ring (:func:`_routes`). One way (``bidirectional=False``): blocks travel to device
``r + 1``, ``n - 1`` hops of a whole block; at step ``t`` device ``r`` holds the block of
``r - t``. Both ways (``bidirectional=True``): blocks travel to ``r + 1`` and to ``r - 1``
at once, each way covering half the ring: ``(n - 1) // 2`` hops of a whole block each way,
and for even ``n`` one more hop in which the block of the opposite device (``n / 2`` away)
arrives in two parts, its first ``ceil(m / 2)`` rows from one side and the rest from the
other (a single row comes whole from one side). Every device then receives ``(n - 1) / 2``
blocks over each of its two links instead of ``n - 1`` over one, in about half the steps.
The reduce-scatter runs the same routes with partial sums in place of blocks.

Several weights (``all_gather_matmul(x, [wq, wk, wv])``): the tokens travel once and each
step multiplies the blocks at hand by every weight; the backward's reduce-scatter sums
``dy_i @ w_i^T`` over the weights in every step, so it too is one ring.

Backward: the gradient of one is the other (:mod:`~pallas_kernels.collectives.vjp`, shared
with the TPU kernels); both run on the forward's routes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import platform as pallas_platform
from pallas_kernels.collectives import vjp

Route = tuple[int, tuple[slice, ...]]
"""A direction of the ring (+1: towards device ``r + 1``, -1: towards ``r - 1``) and the rows
of a block that each of its hops carries."""


def default_bidirectional(platform: str | None = None) -> bool:
    """Whether the rings run both ways when not told (``bidirectional=None``): on TPU only.

    Ring neighbours on a TPU are joined by ICI links that carry data both ways at once; a
    one-way ring loads one direction of each link and leaves the other idle, so running both
    ways halves the time the bytes take as well as the number of steps. Behind an NVLink
    switch (GPU), a one-way ring already sends and receives at full rate on each device's
    port: both ways moves the same bytes per port in half as many, twice as large, steps,
    fewer step latencies for coarser overlap and no clear gain. XLA:CPU overlaps nothing.
    ``platform``: default the default backend's.
    """
    return (platform or pallas_platform.backend()) == "tpu"


def _routes(n: int, m: int, bidirectional: bool) -> list[Route]:
    """The ring for blocks of ``m`` rows on ``n`` devices (module doc). Only a route's last
    hop may carry part of a block; routes without hops (``n == 1``) are left out."""
    whole = slice(0, m)
    if not bidirectional:
        routes = [(1, (whole,) * (n - 1))]
    else:
        hops = (whole,) * ((n - 1) // 2)
        cut = (m + 1) // 2  # even n: the opposite device's block, split between the ways
        ends = ((), ()) if n % 2 else ((slice(0, cut),), (slice(cut, m),))
        routes = [(1, hops + ends[0]), (-1, hops + ends[1])]
    routes = [(way, tuple(rows for rows in hops if rows.stop > rows.start)) for way, hops in routes]
    return [(way, hops) for way, hops in routes if hops]


def _shift(x: jax.Array, axis_name: str, way: int) -> jax.Array:
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, (i + way) % n) for i in range(n)])


def _add_rows(acc: jax.Array, acc_rows: slice, part: jax.Array, part_rows: slice) -> jax.Array:
    """``acc`` (block rows ``acc_rows``) plus ``part`` on the rows ``part_rows`` it covers."""
    if part.shape == acc.shape:
        return acc + part
    start, axis = part_rows.start - acc_rows.start, acc.ndim - 2
    window = lax.slice_in_dim(acc, start, start + part.shape[-2], axis=axis)
    return lax.dynamic_update_slice_in_dim(acc, window + part, start, axis)


def _check(x: jax.Array, w: jax.Array, name: str) -> None:
    if x.ndim < 2 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{name} takes x [..., rows, k] and w [k, f] with matching k, got x {x.shape} "
            f"and w {w.shape}."
        )


def _walk_ring(
    x: jax.Array, axis_name: str, bidirectional: bool, visit: Callable, carry: Any
) -> Any:
    """``carry = visit(carry, block, start)`` for every block of ``all_gather(x)`` (``start``:
    its first row there, device-major), each hop's transfer in flight while the blocks
    already at hand are visited."""
    n, r = lax.axis_size(axis_name), lax.axis_index(axis_name)
    m = x.shape[-2]
    routes = _routes(n, m, bidirectional)
    held = [x] * len(routes)  # per route: the block it forwards next
    at_hand = [(x, r, 0)]  # (rows, their device, their first row in its block)
    longest = max((len(hops) for _, hops in routes), default=0)
    for hop in range(1, longest + 2):  # the last step only visits what arrived
        arriving = []  # this hop's transfers: in flight while the blocks at hand are visited
        for i, (way, hops) in enumerate(routes):
            if hop <= len(hops):
                held[i] = _shift(held[i][..., hops[hop - 1], :], axis_name, way)
                arriving.append((held[i], (r - way * hop) % n, hops[hop - 1].start))
        for block, device, first in at_hand:
            carry = visit(carry, block, device * m + first)
        at_hand = arriving
    return carry


def _gather_matmul(
    x: jax.Array,
    ws: tuple[jax.Array, ...],
    grams_with: tuple[jax.Array, ...],
    axis_name: str,
    bidirectional: bool,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """``(all_gather(x) @ w for w in ws), (all_gather(x)^T g for g in grams_with)`` by one
    ring (``vjp.GatherMatmul``); the gathered ``x`` is never assembled."""
    n, m, axis = lax.axis_size(axis_name), x.shape[-2], x.ndim - 2
    lead = x.shape[:-2]
    ys = tuple(jnp.zeros((*lead, n * m, w.shape[1]), jnp.result_type(x, w)) for w in ws)
    grams = tuple(jnp.zeros((x.shape[-1], g.shape[-1]), jnp.float32) for g in grams_with)

    def visit(carry, block, start):
        ys, grams = carry
        rows = block.shape[-2]
        ys = tuple(lax.dynamic_update_slice_in_dim(y, jnp.matmul(block, w), start, axis)
                   for y, w in zip(ys, ws, strict=True))  # fmt: skip
        grams = tuple(
            gram + vjp.gram(block, lax.dynamic_slice_in_dim(g, start, rows, axis))
            for gram, g in zip(grams, grams_with, strict=True)
        )
        return ys, grams

    return _walk_ring(x, axis_name, bidirectional, visit, (ys, grams))


def _matmul_scatter(
    xs: tuple[jax.Array, ...], ws: tuple[jax.Array, ...], axis_name: str, bidirectional: bool
) -> jax.Array:
    """``psum_scatter(sum_i xs[i] @ ws[i])`` by ring steps."""
    n, r = lax.axis_size(axis_name), lax.axis_index(axis_name)
    rows, axis = xs[0].shape[-2], xs[0].ndim - 2
    if rows % n:
        raise ValueError(
            f"matmul_reduce_scatter splits the {rows} rows of x over {n} devices of "
            f"{axis_name!r}; use a row count that is a multiple of {n}."
        )
    m = rows // n

    def part(device: jax.Array, block_rows: slice) -> jax.Array:
        """This device's term of rows ``block_rows`` of ``device``'s block."""
        start, size = device * m + block_rows.start, block_rows.stop - block_rows.start
        terms = [jnp.matmul(lax.dynamic_slice_in_dim(x, start, size, axis), w)
                 for x, w in zip(xs, ws, strict=True)]  # fmt: skip
        return functools.reduce(jnp.add, terms)

    routes = _routes(n, m, bidirectional)
    sums = [None] * len(routes)  # per route: (partial sum in flight, the block rows it holds)
    # a route's partial sum for device b starts len(hops) hops before b and reaches it last
    longest = max((len(hops) for _, hops in routes), default=0)
    for distance in range(longest, 0, -1):
        for i, (way, hops) in enumerate(routes):
            if distance <= len(hops):
                block_rows = hops[distance - 1]
                acc = part((r + way * distance) % n, block_rows)
                if sums[i] is not None:
                    acc = _add_rows(acc, block_rows, *sums[i])
                sums[i] = (_shift(acc, axis_name, way), block_rows)
    y = part(r, slice(0, m))
    for received in sums:
        y = _add_rows(y, slice(0, m), *received)
    return y


_all_gather_matmul, _matmul_reduce_scatter = vjp.paired(_gather_matmul, _matmul_scatter)


def all_gather_matmul(
    x: jax.Array,
    w: jax.Array | Sequence[jax.Array],
    *,
    axis_name: str,
    bidirectional: bool | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """``all_gather(x, axis=-2) @ w`` by overlapped ring steps (per-device code).

    Args:
      x: ``[..., m, k]`` this device's rows; the gathered rows are ordered by device index.
      w: ``[k, f]`` this device's weight (e.g. a column-parallel shard), or a list or tuple
        of weights ``[k, f_i]`` that multiply the same gathered rows (q, k, v): the rows
        travel once, each step multiplying the blocks at hand by every weight.
      axis_name: the mesh axis of the ring (inside ``shard_map``).
      bidirectional: run the ring both ways (module doc); None: :func:`default_bidirectional`.

    Returns:
      ``[..., n * m, f]``, equal to ``reference.all_gather_matmul_reference``; for a list or
      tuple of weights, a tuple of those.
    """
    several = isinstance(w, list | tuple)
    ws = tuple(w) if several else (w,)
    if not ws:
        raise ValueError("all_gather_matmul got an empty list of weights; pass at least one.")
    for one in ws:
        _check(x, one, "all_gather_matmul")
    way = default_bidirectional() if bidirectional is None else bidirectional
    ys = _all_gather_matmul(x, ws, axis_name, way)
    return ys if several else ys[0]


def matmul_reduce_scatter(
    x: jax.Array, w: jax.Array, *, axis_name: str, bidirectional: bool | None = None
) -> jax.Array:
    """``psum_scatter(x @ w, scatter_dimension=-2)`` by overlapped ring steps.

    Args:
      x: ``[..., rows, k]`` (e.g. the activations of a row-parallel layer, ``k`` split).
      w: ``[k, f]`` this device's weight shard.
      axis_name: the mesh axis of the ring; its size must divide ``rows``.
      bidirectional: run the ring both ways (module doc); None: :func:`default_bidirectional`.

    Returns:
      ``[..., rows / n, f]``: device ``r`` holds rows block ``r`` of the sum over devices.
    """
    _check(x, w, "matmul_reduce_scatter")
    way = default_bidirectional() if bidirectional is None else bidirectional
    return _matmul_reduce_scatter(x, w, axis_name, way)
