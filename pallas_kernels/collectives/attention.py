"""Context-parallel attention: the sequence is split over a mesh axis; every device keeps its
queries and meets every key block of the sequence, one block per step.

Called inside ``shard_map`` on each device's shard (q, k, v ``[b, s, h, d]`` with the global
sequence split over ``axis_name`` in a :mod:`~pallas_kernels.collectives.layout`). Two
strategies, the same math:

* ``"ring"``: K/V blocks travel the ring with ``ppermute``; at step ``t`` device ``r`` holds
  the block of device ``r - t``, starts sending it on, and meanwhile attends its queries to
  it. Only two K/V blocks are alive per device. The backward runs the ring again (it is a
  ``custom_vjp`` that recomputes each block): K/V travel once more, and the dK/dV
  accumulators travel with them, arriving home after ``n`` hops.
* ``"all_gather"``: K/V are all-gathered once (what MaxText does by default), then visited
  block by block; the backward reduce-scatters dK/dV.

Each step attends the local queries to one key block and partial results merge with the
online softmax (:func:`~pallas_kernels.collectives.block.merge`), so no ``[s, S]`` score
matrix exists. The per-block compute (``block_impl``) is the flash kernel of the backend on
GPU (Triton) and TPU (Mosaic), through its log-sum-exp interface (``flash_forward`` /
``flash_backward``), and the jnp block of :mod:`~pallas_kernels.collectives.block`
(XLA) on CPU and wherever a mask is not expressible by a kernel call (a sliding window: its
visibility depends on the traced distance between the blocks). Under a causal mask in the ``zigzag``
layout every step after the first computes exactly half of the block pair, the half that can
be visible (an early key chunk is seen by both local query chunks; a late one only by the
late query chunk), so devices share the work evenly; in the ``contiguous`` layout the blocks
after a device's own are skipped, which leaves the last device with the most work.
Masks (causal, sliding window with sinks, segment ids) are decided from global indices. A
kernel needs only two structural masks: the diagonal step (a device's own block) is causal
on local positions, which in either layout is exactly the global causal mask, and every
later step's computed half is entirely visible (its keys all come before its queries), so it
runs unmasked; segment ids go to the kernel as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import platform
from pallas_kernels.attention import flash_gpu, flash_tpu
from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec
from pallas_kernels.attention.validation import check_attention_inputs
from pallas_kernels.collectives import block
from pallas_kernels.collectives.layout import check_layout, shard_positions

STRATEGIES = ("ring", "all_gather")
BLOCK_IMPLS = ("auto", "pallas", "xla")

Region = tuple[slice, slice] | None
"""Query rows and key rows of a block pair to compute (None: nothing is visible)."""

_KERNELS = {"gpu": flash_gpu, "tpu": flash_tpu}


@dataclasses.dataclass(frozen=True)
class _RingCall:
    axis_name: str
    strategy: str
    layout: str
    spec: MaskSpec
    scale: float
    cap: float | None
    kernel: str | None  # "gpu" / "tpu": that flash kernel per block; None: the jnp block
    interpret: bool


def block_kernel(block_impl: str, sliding_window: int | None) -> str | None:
    """The flash kernel (``"gpu"`` or ``"tpu"``) each block runs, or None for the jnp block.

    ``"auto"``: the backend's kernel on GPU and TPU unless a sliding window is set, XLA on
    CPU; ``"pallas"``: the backend's kernel (Triton off TPU, interpreted on CPU); ``"xla"``.

    Raises:
      ValueError: an unknown ``block_impl``, or ``"pallas"`` with a sliding window.
    """
    if block_impl not in BLOCK_IMPLS:
        raise ValueError(f"block_impl must be one of {BLOCK_IMPLS}, got {block_impl!r}.")
    backend = platform.backend()
    if block_impl == "xla" or (block_impl == "auto" and backend not in _KERNELS):
        return None
    if sliding_window is not None:
        if block_impl == "auto":
            return None
        raise ValueError(
            "block_impl='pallas' cannot run a sliding window under context parallelism (a "
            "block's visibility depends on the traced distance between devices' chunks); "
            "use block_impl='auto' or 'xla'."
        )
    return "tpu" if backend == "tpu" else "gpu"


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    axis_name: str,
    strategy: str = "ring",
    layout: str = "zigzag",
    causal: bool = True,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
    block_impl: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Self-attention over a sequence split along ``axis_name`` (per-device code).

    Args:
      q: ``[b, s, hq, d]`` this device's queries; k, v: ``[b, s, hkv, d]`` its keys and
        values (``hq % hkv == 0``). ``s`` is the local length: the global sequence is ``s``
        times the size of ``axis_name``, laid out as ``layout`` says.
      q_segment_ids, kv_segment_ids: ``[b, s]`` int of the local positions (packing);
        ``kv_segment_ids`` defaults to ``q_segment_ids``.
      axis_name: the mesh axis the sequence is split over (inside ``shard_map``).
      strategy: ``"ring"`` or ``"all_gather"`` (module doc).
      layout: ``"zigzag"`` (balanced under a causal mask) or ``"contiguous"``.
      causal, sliding_window, num_sink_tokens, logit_soft_cap, scale: as
        ``pallas_kernels.attention`` on the global sequence.
      block_impl: the per-block compute, ``"auto"``, ``"pallas"`` or ``"xla"``
        (:func:`block_kernel`).
      interpret: run the Pallas kernels in interpret mode; None = on CPU only.

    Returns:
      ``[b, s, hq, d]`` in ``q.dtype``: this device's rows of attention over the global
      sequence.

    Raises:
      ValueError / TypeError: bad shapes, options, or a local length the layout cannot
        split (``zigzag`` needs it even).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, sliding_window, num_sink_tokens,
        logit_soft_cap, scale,
    )  # fmt: skip
    s = q.shape[1]
    if k.shape[1] != s:
        raise ValueError(
            f"context-parallel attention is self-attention: q and k must hold the same local "
            f"length, got {s} and {k.shape[1]}."
        )
    num_shards = lax.axis_size(axis_name)
    check_layout(layout, s * num_shards, num_shards)
    if q_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    cfg = _RingCall(
        axis_name=axis_name,
        strategy=strategy,
        layout=layout,
        spec=MaskSpec(
            causal=causal,
            sliding_window=sliding_window,
            num_sink_tokens=num_sink_tokens if sliding_window is not None else 0,
        ),
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        cap=logit_soft_cap,
        kernel=block_kernel(block_impl, sliding_window),
        interpret=platform.interpret_mode(interpret),
    )
    return _attention(cfg, q, k, v, q_segment_ids, kv_segment_ids)


def ring_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, **options) -> jax.Array:
    """:func:`context_attention` with ``strategy="ring"``."""
    return context_attention(q, k, v, q_segment_ids, kv_segment_ids, strategy="ring", **options)


def all_gather_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, **options) -> jax.Array:
    """:func:`context_attention` with ``strategy="all_gather"``."""
    return context_attention(
        q, k, v, q_segment_ids, kv_segment_ids, strategy="all_gather", **options
    )


# ---------------------------------------------------------------------------
# One block pair: the flash kernel or the jnp block, [b, s, hq, d] in and out.
# ---------------------------------------------------------------------------


def _kernel_options(cfg: _RingCall, diagonal: bool) -> dict:
    """A kernel call's mask: causal on local positions for a device's own block, none for
    the (entirely visible) computed half of any other (module doc)."""
    return dict(
        mask=MaskSpec(causal=cfg.spec.causal and diagonal),
        scale=cfg.scale,
        logit_soft_cap=cfg.cap,
        interpret=cfg.interpret,
    )


def _grouped(q: jax.Array, k: jax.Array) -> jax.Array:
    """``[b, s, hq, d]`` -> float32 ``[b, s, hkv, g, d]`` (the jnp block's layout)."""
    b, s, hq, d = q.shape
    return q.astype(jnp.float32).reshape(b, s, k.shape[2], hq // k.shape[2], d)


def _block_forward(cfg: _RingCall, q, k, v, q_seg, kv_seg, q_index, kv_index, diagonal: bool):
    """``(o, lse)``, float32 ``[b, sq, hq, d]`` and ``[b, sq, hq]``, of one block pair."""
    if cfg.kernel is not None:
        o, lse = _KERNELS[cfg.kernel].flash_forward(
            q, k, v, q_seg, kv_seg, **_kernel_options(cfg, diagonal)
        )
        return o.astype(jnp.float32), lse
    mask = block.visible(cfg.spec, q_index, kv_index, q_seg, kv_seg)
    f32 = (x.astype(jnp.float32) for x in (k, v))
    o, lse = block.block_forward(_grouped(q, k), *f32, mask, scale=cfg.scale, cap=cfg.cap)
    return o.reshape(q.shape), lse.reshape(q.shape[:-1])


def _block_backward(
    cfg: _RingCall, q, k, v, q_seg, kv_seg, q_index, kv_index, o, lse, do, diagonal
):
    """float32 ``(dq, dk, dv)`` of one block pair from the rows' final ``o`` and ``lse``."""
    if cfg.kernel is not None:
        grads = _KERNELS[cfg.kernel].flash_backward(
            q, k, v, q_seg, kv_seg, o, lse, do, **_kernel_options(cfg, diagonal)
        )
        return tuple(g.astype(jnp.float32) for g in grads)
    mask = block.visible(cfg.spec, q_index, kv_index, q_seg, kv_seg)
    do = do.astype(jnp.float32)
    delta = jnp.sum(do * o.astype(jnp.float32), axis=-1)
    grouped = (_grouped(x, k) for x in (q, do))
    dq, dk, dv = block.block_backward(
        next(grouped), k.astype(jnp.float32), v.astype(jnp.float32), next(grouped),
        _grouped(lse[..., None], k)[..., 0], _grouped(delta[..., None], k)[..., 0], mask,
        scale=cfg.scale, cap=cfg.cap,
    )  # fmt: skip
    return dq.reshape(q.shape), dk, dv


# ---------------------------------------------------------------------------
# The walk over key blocks.
# ---------------------------------------------------------------------------


def _kv_blocks(cfg: _RingCall, kv: tuple) -> Iterator[tuple[jax.Array, tuple]]:
    """``(source device, its K/V block)`` for each step (module doc)."""
    ax = cfg.axis_name
    n, r = lax.axis_size(ax), lax.axis_index(ax)
    if cfg.strategy == "all_gather":
        s = kv[0].shape[1]
        full = jax.tree.map(lambda x: lax.all_gather(x, ax, axis=1, tiled=True), kv)
        for t in range(n):
            src = (r - t) % n
            yield (
                src,
                jax.tree.map(lambda x, src=src: lax.dynamic_slice_in_dim(x, src * s, s, 1), full),
            )
        return
    for t in range(n):
        # send the block on before computing with it, so the transfer overlaps the step
        nxt = _shift(kv, ax) if t < n - 1 else None
        yield (r - t) % n, kv
        kv = nxt


def _shift(x, axis_name: str):
    """Every device's ``x`` moved to the next device of the ring."""
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


def _regions(cfg: _RingCall, t: int, s: int) -> tuple[Region, Region] | None:
    """The block pair to compute at step ``t`` when the keys come from an earlier device
    and when from a later one; None when the whole pair is computed (module doc)."""
    if t == 0 or not cfg.spec.causal:
        return None
    everything = (slice(0, s), slice(0, s))
    if cfg.layout == "contiguous":
        return everything, None
    c = s // 2
    return (slice(0, s), slice(0, c)), (slice(c, s), slice(0, s))


def _run_step(cfg: _RingCall, t: int, src, s: int, compute: Callable[[Region], tuple]):
    """``compute`` over the step's region, picked on device when it depends on ``src``."""
    regions = _regions(cfg, t, s)
    if regions is None:
        return compute((slice(0, s), slice(0, s)))
    earlier, later = regions
    r = lax.axis_index(cfg.axis_name)
    return lax.cond(src < r, lambda: compute(earlier), lambda: compute(later))


def _pad(x: jax.Array, rows: slice, length: int, value: float) -> jax.Array:
    """``x`` (rows ``rows`` of a ``length``-row array along axis 1) padded with ``value``."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (rows.start, length - rows.stop)
    return jnp.pad(x, pad, constant_values=value)


def _rows(x: jax.Array | None, rows: slice) -> jax.Array | None:
    return None if x is None else x[:, rows]


def _forward(cfg: _RingCall, q, k, v, q_seg, kv_seg):
    """float32 ``(o, lse)`` of the local queries over the whole sequence (module doc)."""
    n, r = lax.axis_size(cfg.axis_name), lax.axis_index(cfg.axis_name)
    s = q.shape[1]
    q_index = shard_positions(cfg.layout, s, r, n)
    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:-1], MASK_VALUE, jnp.float32)
    for t, (src, (k_t, v_t, seg_t)) in enumerate(_kv_blocks(cfg, (k, v, kv_seg))):
        kv_index = shard_positions(cfg.layout, s, src, n)

        def compute(region: Region, t=t, k_t=k_t, v_t=v_t, seg_t=seg_t, kv_index=kv_index):
            if region is None:
                return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], MASK_VALUE)
            qs, ks = region
            o_b, lse_b = _block_forward(
                cfg, q[:, qs], k_t[:, ks], v_t[:, ks], _rows(q_seg, qs), _rows(seg_t, ks),
                q_index[qs], kv_index[ks], diagonal=t == 0,
            )  # fmt: skip
            return _pad(o_b, qs, s, 0.0), _pad(lse_b, qs, s, MASK_VALUE)

        o, lse = block.merge(o, lse, *_run_step(cfg, t, src, s, compute))
    return o, lse


def _backward(cfg: _RingCall, residuals, do):
    """dq, dk, dv: the ring (or gathered blocks) visited again, dK/dV sent home."""
    q, k, v, q_seg, kv_seg, o, lse = residuals
    ax = cfg.axis_name
    n, r = lax.axis_size(ax), lax.axis_index(ax)
    s = q.shape[1]
    q_index = shard_positions(cfg.layout, s, r, n)
    dq = jnp.zeros(q.shape, jnp.float32)
    if cfg.strategy == "ring":  # travels with the block it belongs to
        dkv = (jnp.zeros(k.shape, jnp.float32),) * 2
    else:
        dkv = (jnp.zeros((k.shape[0], n * s, *k.shape[2:]), jnp.float32),) * 2
    for t, (src, (k_t, v_t, seg_t)) in enumerate(_kv_blocks(cfg, (k, v, kv_seg))):
        kv_index = shard_positions(cfg.layout, s, src, n)

        def compute(region: Region, t=t, k_t=k_t, v_t=v_t, seg_t=seg_t, kv_index=kv_index):
            if region is None:
                nothing = jnp.zeros(k_t.shape, jnp.float32)
                return jnp.zeros(q.shape, jnp.float32), nothing, nothing
            qs, ks = region
            dq_b, dk_b, dv_b = _block_backward(
                cfg, q[:, qs], k_t[:, ks], v_t[:, ks], _rows(q_seg, qs), _rows(seg_t, ks),
                q_index[qs], kv_index[ks], o[:, qs], lse[:, qs], do[:, qs], diagonal=t == 0,
            )  # fmt: skip
            return _pad(dq_b, qs, s, 0.0), _pad(dk_b, ks, s, 0.0), _pad(dv_b, ks, s, 0.0)

        dq_t, dk_t, dv_t = _run_step(cfg, t, src, s, compute)
        dq = dq + dq_t
        if cfg.strategy == "ring":
            dkv = _shift((dkv[0] + dk_t, dkv[1] + dv_t), ax)
        else:
            dkv = tuple(
                lax.dynamic_update_slice_in_dim(
                    acc, lax.dynamic_slice_in_dim(acc, src * s, s, 1) + part, src * s, 1
                )
                for acc, part in zip(dkv, (dk_t, dv_t), strict=True)
            )
    if cfg.strategy == "all_gather":
        dkv = tuple(lax.psum_scatter(x, ax, scatter_dimension=1, tiled=True) for x in dkv)
    return dq.astype(q.dtype), *(g.astype(x.dtype) for g, x in zip(dkv, (k, v), strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _RingCall, q, k, v, q_seg, kv_seg):
    """q: [b, s, hq, d], k, v: [b, s, hkv, d] -> o: [b, s, hq, d] in q.dtype."""
    return _forward(cfg, q, k, v, q_seg, kv_seg)[0].astype(q.dtype)


def _attention_fwd(cfg: _RingCall, q, k, v, q_seg, kv_seg):
    o, lse = _forward(cfg, q, k, v, q_seg, kv_seg)
    out = o.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(cfg: _RingCall, residuals, do):
    return *_backward(cfg, residuals, do), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
