"""Ragged paged attention on TPU: jax's own Mosaic kernel, wrapped.

``jax.experimental.pallas.ops.tpu.ragged_paged_attention`` takes exactly our layout
(``kv_pages: [P, page_size, 2 * hkv, d]``, K/V interleaved on axis 2) and arguments; it
walks, per block of heads and of queries, the pages of each sequence with double-buffered
DMAs. What it lacks, dispatch routes elsewhere (:func:`unsupported_reason`): attention
sinks, and head counts Mosaic cannot tile. Its rows past ``cu_q_lens[num_seqs]`` hold
stale scratch; dispatch zeroes them.
"""

from __future__ import annotations

import contextlib

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged.layout import PagedBatch

DEFAULT_BLOCKS = (128, 32)
"""``(kv pages, queries)`` per block off a TPU (jax's own untuned default); on a TPU the
kernel's tuned table decides."""


def _jax_kernel():
    """jax's kernel package, imported on first use (GPU and CPU hosts never need it), or
    None where this jax does not ship it."""
    try:
        from jax.experimental.pallas.ops.tpu import ragged_paged_attention
    except ImportError:
        return None
    return ragged_paged_attention


def unsupported_reason(q: jax.Array, kv_pages: jax.Array, *, sinks: int | None) -> str | None:
    """Why jax's TPU kernel cannot run this call; None when it can."""
    rpa = _jax_kernel()
    if rpa is None:
        return f"jax {jax.__version__} ships no TPU ragged paged attention kernel"
    if sinks:
        return "jax's TPU ragged paged attention kernel has no attention sinks"
    if q.dtype != kv_pages.dtype:
        return f"q ({q.dtype}) and kv_pages ({kv_pages.dtype}) must share one dtype"
    if kv_pages.shape[3] % 128:
        return f"the kernel needs head_dim a multiple of 128 (lane width), got {kv_pages.shape[3]}"
    h2 = kv_pages.shape[2]
    try:
        rpa.kernel.get_min_heads_per_blk(q.shape[1], h2, q.dtype, kv_pages.dtype)
    except ValueError as e:
        return f"Mosaic cannot tile {h2} combined K/V heads of {kv_pages.dtype} ({e})"
    return None


def _on_tpu() -> bool:
    return jax.devices()[0].platform == "tpu"


def paged_attention(
    batch: PagedBatch,
    *,
    sm_scale: float,
    sliding_window: int | None,
    interpret: bool = False,
) -> jax.Array:
    """jax's Mosaic kernel on validated inputs; ``interpret`` runs it under the TPU
    interpreter. Padding rows are left as the kernel leaves them."""
    blocks = (None, None)
    if not _on_tpu():
        blocks = (
            min(DEFAULT_BLOCKS[0], batch.page_indices.shape[1]),
            min(DEFAULT_BLOCKS[1], batch.q.shape[0]),
        )
    ctx = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with ctx:
        return _jax_kernel().ragged_paged_attention(
            *batch,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            num_kv_pages_per_block=blocks[0],
            num_queries_per_block=blocks[1],
        )
