"""Where things sit in a ragged paged batch: token -> sequence, positions, KV slots.

A batch packs the new tokens of ``S`` sequences one after another (``q: [T, hq, d]``);
sequence ``i`` owns rows ``cu_q_lens[i]:cu_q_lens[i + 1]`` for ``i < num_seqs``, and its
``q_len_i`` new tokens are the last ones of its ``kv_lens[i]`` keys, so its query ``j``
sits at position ``kv_lens[i] - q_len_i + j``. Rows at or past ``cu_q_lens[num_seqs]``
are padding. Keys live in pages ``kv_pages: [P, page_size, 2 * hkv, d]`` (K of kv head
``h`` at index ``2h``, V at ``2h + 1``); sequence ``i``'s key at position ``p`` is
``kv_pages[page_indices[i, p // page_size], p % page_size]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class PagedBatch(NamedTuple):
    """The array arguments of ``ragged_paged_attention``, as every implementation takes
    them (shapes in the module docstring)."""

    q: jax.Array  # [T, hq, d]
    kv_pages: jax.Array  # [P, page_size, 2 * hkv, d]
    kv_lens: jax.Array  # i32[S]
    page_indices: jax.Array  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array  # i32[S + 1]
    num_seqs: jax.Array  # i32[1]


@dataclasses.dataclass(frozen=True)
class QueryTiles:
    """Runs of at most ``tile_tokens`` consecutive rows of one sequence, each sequence's
    rows cut from its first one: the work items of the kernels. All ``[W]`` int32.

    Attributes:
      seq: the tile's sequence.
      start, end: its rows ``[start, end)``; spare tiles have ``start == end``.
      pos0: the position of row ``start`` in its sequence (row ``start + r`` sits at
        ``pos0 + r``).
      kv_len: its sequence's KV length (0 on spare tiles).
    """

    seq: jax.Array
    start: jax.Array
    end: jax.Array
    pos0: jax.Array
    kv_len: jax.Array


def query_tiles(
    num_tokens: int,
    tile_tokens: int,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
) -> QueryTiles:
    """:class:`QueryTiles` of a batch of ``num_tokens`` rows.

    There are ``W = num_tokens`` tiles of one row (then tile ``w`` is row ``w``), else
    ``W = cdiv(num_tokens, tile_tokens) + S``, enough for any split of the rows into
    sequences. Entries of ``cu_q_lens`` past ``num_seqs`` are ignored; ``cu_q_lens[0]``
    is 0.
    """
    max_seqs = kv_lens.shape[0]
    num_items = num_tokens if tile_tokens == 1 else -(-num_tokens // tile_tokens) + max_seqs
    cu = used_cu_q_lens(cu_q_lens, num_seqs)
    q_lens = cu[1:] - cu[:-1]
    tiles = (q_lens + tile_tokens - 1) // tile_tokens
    ends = jnp.cumsum(tiles)
    items = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, items, side="right"), max_seqs - 1)
    local = items - (ends[seq] - tiles[seq])  # tile index within its sequence
    valid = items < ends[-1]
    start = jnp.where(valid, cu[seq] + local * tile_tokens, 0)
    end = jnp.where(valid, jnp.minimum(start + tile_tokens, cu[seq + 1]), 0)
    pos0 = kv_lens[seq] - q_lens[seq] + local * tile_tokens
    kv_len = jnp.where(valid, kv_lens[seq], 0)
    return QueryTiles(*(x.astype(jnp.int32) for x in (seq, start, end, pos0, kv_len)))


def used_cu_q_lens(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """``cu_q_lens`` with entries past ``num_seqs`` set to ``cu_q_lens[num_seqs]``: sequences
    not in use own no rows, whatever the caller left there."""
    n = num_seqs[0]
    return jnp.where(jnp.arange(cu_q_lens.shape[0]) <= n, cu_q_lens, cu_q_lens[n])


def zero_padding_rows(out: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """``out: [T, ...]`` with rows at or past ``cu_q_lens[num_seqs]`` set to zero (kernels
    leave whatever their buffers held there)."""
    rows = jnp.arange(out.shape[0]).reshape(-1, *([1] * (out.ndim - 1)))
    return jnp.where(rows < cu_q_lens[num_seqs[0]], out, jnp.zeros((), out.dtype))


def split_kv(kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., 2 * hkv, d]`` interleaved pages -> K, V of shape ``[..., hkv, d]`` each."""
    *lead, h2, d = kv.shape
    kv = kv.reshape(*lead, h2 // 2, 2, d)
    return kv[..., 0, :], kv[..., 1, :]


def write_kv_pages(
    kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> jax.Array:
    """Scatter new tokens' keys and values into their cache slots.

    Args:
      kv_pages: ``[P, page_size, 2 * hkv, d]`` one layer's cache (K at even, V at odd
        head indices).
      k, v: ``[T, hkv, d]`` the new tokens' keys and values (cast to the cache dtype).
      slot_mapping: ``[T]`` int, flat slot ``page * page_size + offset`` of each token;
        ``-1`` (padding) writes nothing.

    Returns:
      The updated cache (jit with the cache donated to update it in place).

    Raises:
      ValueError: shapes that do not match the cache.
    """
    num_pages, page_size, h2, d = kv_pages.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (h2 // 2, d):
        raise ValueError(
            f"k and v must both have shape [T, {h2 // 2}, {d}] (T tokens, the cache's kv heads "
            f"and head_dim), got {k.shape} and {v.shape}."
        )
    if slot_mapping.shape != (k.shape[0],) or not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(
            f"slot_mapping must be an integer array of shape ({k.shape[0]},), got "
            f"{slot_mapping.dtype}{slot_mapping.shape}."
        )
    num_slots = num_pages * page_size
    new = jnp.stack([k, v], axis=2).reshape(k.shape[0], h2, d).astype(kv_pages.dtype)
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range: dropped
    flat = kv_pages.reshape(num_slots, h2, d).at[slots].set(new, mode="drop")
    return flat.reshape(kv_pages.shape)
