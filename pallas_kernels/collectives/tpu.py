"""Collective matmuls as Pallas TPU kernels: remote DMA between ring neighbours, DMA
semaphores, the matmul of the block at hand running while the next block is in flight.

Per-device code inside ``shard_map`` (the same math and signatures as
:mod:`pallas_kernels.collectives.matmul`, 2-D operands, whole arrays in VMEM)::

    all_gather_matmul      x: [m, k], w: [k, f] -> y: [n m, f] (and the gathered x: [n, m, k])
      copy x into slot r of the gather buffer; barrier with both neighbours;
      step t (block of device s = r - t in slot s):
          start DMA  slot s -> slot s of the right neighbour       (not at the last step)
          y[s m : (s + 1) m] = slot s @ w                          (overlaps the DMA)
          wait: our send done, the left neighbour's block arrived in slot s - 1

    matmul_reduce_scatter  x: [n m, k], w: [k, f] -> y: [m, f]
      step t (rows block b = r - 1 - t):
          part = x[b m : (b + 1) m] @ w                            (overlaps the last DMA)
          wait for the previous step's DMA; acc = part + recv[t]   (recv[0] = 0)
          last step: y = acc; else: send[t] = acc, start DMA send[t] -> recv[t + 1] on the right

Every step uses its own buffer slot, so a DMA never writes a slot someone still reads:
the kernels are race-free without flow-control semaphores (checked in TPU interpret mode
with ``detect_races=True``), at the price of ``n`` slots of VMEM; production-sized blocks
would double-buffer with a credit semaphore instead. The custom VJPs pair them: the
backward of one is the other (:mod:`~pallas_kernels.collectives.vjp`); the weight gradients
contract against the gathered operand the all-gather kernel returns, or, where no matmul
goes with it, an XLA all-gather of the saved shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.collectives import vjp
from pallas_kernels.platform import Interpret


def _neighbours(axis_name: str, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    r = lax.axis_index(axis_name)
    return r, lax.rem(r + 1, n), lax.rem(r + n - 1, n)


def _barrier(axis_name: str, left: jax.Array, right: jax.Array) -> None:
    """Both neighbours have entered the kernel (their buffers exist) before any DMA."""
    sem = pltpu.get_barrier_semaphore()
    for device in (left, right):
        pl.semaphore_signal(sem, 1, device_id={axis_name: device})
    pl.semaphore_wait(sem, 2)


def _send(src_ref, dst_ref, send_sem, recv_sem, axis_name: str, device: jax.Array):
    """Start a DMA of ``src_ref`` into ``dst_ref`` on ``device``; ``recv_sem`` (there) counts
    only this slot's bytes, so a later DMA arriving first cannot pass for it."""
    copy = pltpu.make_async_remote_copy(
        src_ref, dst_ref, send_sem, recv_sem, device_id={axis_name: device}
    )
    copy.start()
    return copy


def _arrival(slot_ref, recv_sem):
    """A descriptor of the DMA arriving in our ``slot_ref``, to wait for its bytes."""
    return pltpu.make_async_copy(slot_ref, slot_ref, recv_sem)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _gather_matmul_kernel(x_ref, w_ref, y_ref, gathered_ref, send_sem, recv_sems, *,
                          axis_name: str, n: int):  # fmt: skip
    # x_ref: [m, k]  w_ref: [k, f]  y_ref: [n m, f]  gathered_ref: [n, m, k]  recv_sems: [n]
    m = x_ref.shape[0]
    r, right, left = _neighbours(axis_name, n)
    gathered_ref[r] = x_ref[...]
    _barrier(axis_name, left, right)
    for t in range(n):
        src = lax.rem(r + n - t, n)
        send = None
        if t < n - 1:
            send = _send(gathered_ref.at[src], gathered_ref.at[src], send_sem, recv_sems.at[src],
                         axis_name, right)  # fmt: skip
        rows = pl.ds(pl.multiple_of(src * m, m), m)
        y_ref[rows, :] = _dot(gathered_ref[src], w_ref[...]).astype(y_ref.dtype)
        if send is not None:
            send.wait_send()
            arriving = lax.rem(src + n - 1, n)
            _arrival(gathered_ref.at[arriving], recv_sems.at[arriving]).wait_recv()


def _matmul_scatter_kernel(x_ref, w_ref, y_ref, send_ref, recv_ref, send_sem, recv_sems, *,
                           axis_name: str, n: int):  # fmt: skip
    # x_ref: [n m, k]  w_ref: [k, f]  y_ref: [m, f]  send_ref, recv_ref: [n, m, f] float32
    # recv_sems: [n]
    m = y_ref.shape[0]
    r, right, left = _neighbours(axis_name, n)
    _barrier(axis_name, left, right)
    send = None
    for t in range(n):
        block = lax.rem(r + 2 * n - 1 - t, n)
        part = _dot(x_ref[pl.ds(pl.multiple_of(block * m, m), m), :], w_ref[...])
        if send is not None:
            send.wait_send()
            _arrival(recv_ref.at[t], recv_sems.at[t]).wait_recv()
            part = part + recv_ref[t]
        if t == n - 1:
            y_ref[...] = part.astype(y_ref.dtype)
            continue
        send_ref[t] = part
        send = _send(send_ref.at[t], recv_ref.at[t + 1], send_sem, recv_sems.at[t + 1],
                     axis_name, right)  # fmt: skip


def _vmem() -> pl.BlockSpec:
    return pl.BlockSpec(memory_space=pltpu.VMEM)


def _call(kernel, out_shape, scratch, n: int, interpret: Interpret):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        in_specs=[_vmem()] * 2,
        out_specs=jax.tree.map(lambda _: _vmem(), out_shape),
        scratch_shapes=[*scratch, pltpu.SemaphoreType.DMA, pltpu.SemaphoreType.DMA((n,))],
        compiler_params=pltpu.CompilerParams(collective_id=0),
        interpret=interpret,
    )


def _gather_matmul(x, ws, grams_with, axis_name: str, interpret: Interpret):
    """``vjp.GatherMatmul`` with at most one weight: the kernel when there is one (it hands
    back the gathered ``x`` for the grams), else an XLA all-gather for the grams alone."""
    if not ws:
        gathered = lax.all_gather(x, axis_name, tiled=True)
        return (), tuple(vjp.gram(gathered, g) for g in grams_with)
    (w,) = ws
    n = lax.axis_size(axis_name)
    m, k = x.shape
    out_shape = (
        jax.ShapeDtypeStruct((n * m, w.shape[1]), jnp.result_type(x, w)),
        jax.ShapeDtypeStruct((n, m, k), x.dtype),
    )
    kernel = functools.partial(_gather_matmul_kernel, axis_name=axis_name, n=n)
    y, gathered = _call(kernel, out_shape, [], n, interpret)(x, w)
    gathered = gathered.reshape(n * m, k)
    return (y,), tuple(vjp.gram(gathered, g) for g in grams_with)


def _matmul_scatter(xs, ws, axis_name: str, interpret: Interpret):
    """``psum_scatter(x @ w)``: one operand pair (``vjp.MatmulScatter``)."""
    (x,), (w,) = xs, ws
    n = lax.axis_size(axis_name)
    if x.shape[0] % n:
        raise ValueError(
            f"matmul_reduce_scatter splits the {x.shape[0]} rows of x over {n} devices of "
            f"{axis_name!r}; use a row count that is a multiple of {n}."
        )
    m, f = x.shape[0] // n, w.shape[1]
    out_shape = jax.ShapeDtypeStruct((m, f), jnp.result_type(x, w))
    slots = [pltpu.VMEM((n, m, f), jnp.float32)] * 2
    kernel = functools.partial(_matmul_scatter_kernel, axis_name=axis_name, n=n)
    return _call(kernel, out_shape, slots, n, interpret)(x, w)


_all_gather_matmul, _matmul_reduce_scatter = vjp.paired(_gather_matmul, _matmul_scatter)


def _check_2d(x: jax.Array, w: jax.Array, name: str) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"the TPU {name} kernel takes x [rows, k] and w [k, f] with matching k, got x "
            f"{x.shape} and w {w.shape}; reshape leading dims into rows, or use "
            f"pallas_kernels.collectives.matmul.{name} for any rank."
        )


def all_gather_matmul(
    x: jax.Array, w: jax.Array, *, axis_name: str, interpret: Interpret = False
) -> jax.Array:
    """``all_gather(x) @ w`` on TPU by remote DMA (module doc); x ``[m, k]``, w ``[k, f]``
    -> ``[n m, f]``. ``interpret``: a ``pltpu.InterpretParams`` (or True) runs the kernel
    in TPU interpret mode on CPU."""
    _check_2d(x, w, "all_gather_matmul")
    return _all_gather_matmul(x, (w,), axis_name, interpret)[0]


def matmul_reduce_scatter(
    x: jax.Array, w: jax.Array, *, axis_name: str, interpret: Interpret = False
) -> jax.Array:
    """``psum_scatter(x @ w)`` on TPU by remote DMA (module doc); x ``[n m, k]``, w
    ``[k, f]`` -> ``[m, f]``. ``interpret`` as :func:`all_gather_matmul`."""
    _check_2d(x, w, "matmul_reduce_scatter")
    return _matmul_reduce_scatter(x, w, axis_name, interpret)
