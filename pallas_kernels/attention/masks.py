"""Attention mask semantics, shared by the reference and every kernel.

Positions are absolute sequence indices. A query row ``i`` of a ``[sq]`` query
sequence sits at position ``i + q_offset``; with ``causal=True`` and
``sq != skv`` the ends are aligned (``q_offset = skv - sq``), otherwise
``q_offset = 0``. Key ``j`` sits at position ``j``.

Key ``j`` is visible from a query at position ``p`` iff all of:

* ``j < kv_len``                         (keys past the valid length are padding);
* ``j <= p``                             if causal;
* ``p - j < sliding_window or j < num_sink_tokens``  if a window is set;
* ``q_segment == kv_segment``            if segment ids are given.

The same predicate decides which key blocks a query block can see
(:func:`kv_block_ranges`) and which query blocks can see a key block
(:func:`q_block_range`), so kernels skip fully masked blocks instead of
computing and discarding them. All helpers accept Python ints (static block
bookkeeping) and traced int32 scalars (``pl.program_id`` arithmetic).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf: keeps exp() and its gradient NaN-free on rows
# where every key is masked.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IntLike = int | jax.Array


def _is_static(*xs: IntLike) -> bool:
    return all(isinstance(x, int) for x in xs)


def _max(a: IntLike, b: IntLike) -> IntLike:
    return max(a, b) if _is_static(a, b) else jnp.maximum(a, b)


def _min(a: IntLike, b: IntLike) -> IntLike:
    return min(a, b) if _is_static(a, b) else jnp.minimum(a, b)


def _select(cond: bool | jax.Array, a: IntLike, b: IntLike) -> IntLike:
    if isinstance(cond, bool):
        return a if cond else b
    # Arithmetic rather than jnp.where: the Triton lowering of a scalar select
    # between two literals builds operands of the predicate's type (i1).
    return b + (a - b) * cond.astype(jnp.int32)


def _floordiv(a: IntLike, b: int) -> IntLike:
    """``a // b`` for ``a >= 0`` (lax.div truncates, which is floor there)."""
    return a // b if _is_static(a) else lax.div(a, jnp.int32(b))


def _cdiv(a: IntLike, b: int) -> IntLike:
    """``ceil(a / b)`` for ``a >= 0``."""
    return _floordiv(a + b - 1, b)


def _clamp_sub_range(
    sub_lo: IntLike, sub_hi: IntLike, lo: IntLike, hi: IntLike
) -> tuple[IntLike, IntLike]:
    """``[sub_lo, sub_hi)`` clipped into ``[lo, hi)`` (empty ranges sit inside it)."""
    sub_lo = _min(_max(sub_lo, lo), hi)
    return sub_lo, _min(_max(sub_hi, sub_lo), hi)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the structural (position-based) mask.

    Attributes:
      causal: keys after the query position are masked.
      sliding_window: if set, key ``j`` is visible from position ``p`` only when
        ``p - j < sliding_window`` (unless ``j`` is a sink token).
      num_sink_tokens: keys ``j < num_sink_tokens`` ignore the window.
      q_offset: absolute position of query row 0.
    """

    causal: bool
    sliding_window: int | None = None
    num_sink_tokens: int = 0
    q_offset: int = 0

    @classmethod
    def for_attention(
        cls,
        sq: int,
        skv: int,
        *,
        causal: bool,
        sliding_window: int | None,
        num_sink_tokens: int,
    ) -> MaskSpec:
        """The mask of ``attention`` for ``sq`` queries against ``skv`` keys."""
        return cls(
            causal=causal,
            sliding_window=sliding_window,
            num_sink_tokens=num_sink_tokens if sliding_window is not None else 0,
            q_offset=skv - sq if causal else 0,
        )

    def visible(self, q_pos: jax.Array, kv_pos: jax.Array, kv_len: IntLike) -> jax.Array:
        """Boolean visibility of keys at ``kv_pos`` from queries at ``q_pos``.

        ``q_pos`` and ``kv_pos`` are absolute positions that broadcast against
        each other (e.g. ``[tq, 1]`` and ``[1, tk]``).
        """
        ok = kv_pos < kv_len
        if self.causal:
            ok = ok & (kv_pos <= q_pos)
        if self.sliding_window is not None:
            in_window = q_pos - kv_pos < self.sliding_window
            if self.num_sink_tokens:
                in_window = in_window | (kv_pos < self.num_sink_tokens)
            ok = ok & in_window
        return ok

    def block_visible(
        self,
        q_row0: IntLike,
        kv0: IntLike,
        shape: tuple[int, int],
        kv_len: IntLike,
        *,
        kv_major: bool = False,
    ) -> jax.Array:
        """Visibility of the tile whose first query row / key is ``q_row0`` / ``kv0``.

        ``shape`` is ``(tq, tk)``, or ``(tk, tq)`` with ``kv_major`` (transposed
        tiles of a dK/dV kernel). ``q_row0`` is a row of the query sequence;
        ``q_offset`` is added here.
        """
        q_axis, kv_axis = (1, 0) if kv_major else (0, 1)
        q_pos = q_row0 + self.q_offset + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        kv_pos = kv0 + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
        return self.visible(q_pos, kv_pos, kv_len)

    def kv_block_ranges(
        self, q_first: IntLike, q_last: IntLike, kv_len: IntLike, block_kv: int
    ) -> tuple[tuple[IntLike, IntLike], tuple[IntLike, IntLike]]:
        """Key blocks that queries at positions ``[q_first, q_last]`` can see.

        Returns ``((sink_lo, sink_hi), (lo, hi))``: two half-open ranges of
        block indices, disjoint, in increasing order. The first covers sink
        tokens that lie before the window; it is empty without a window.
        """
        hi_key = _min(kv_len, q_last + 1) if self.causal else kv_len
        hi_key = _max(hi_key, 0)
        lo_key: IntLike = 0
        if self.sliding_window is not None:
            lo_key = _max(q_first - self.sliding_window + 1, 0)
        lo = _floordiv(lo_key, block_kv)
        hi = _select(lo_key < hi_key, _max(_cdiv(hi_key, block_kv), lo), lo)
        sink_hi = 0
        if self.num_sink_tokens:
            sink_hi = _cdiv(_min(self.num_sink_tokens, hi_key), block_kv)
            # Stop where the window blocks start, unless there are none.
            sink_hi = _select(lo < hi, _min(sink_hi, lo), sink_hi)
        return (0, sink_hi), (lo, hi)

    def full_kv_block_range(
        self, q_first: IntLike, q_last: IntLike, kv_len: IntLike, block_kv: int, lo, hi
    ) -> tuple[IntLike, IntLike]:
        """Sub-range of the window blocks ``[lo, hi)`` that every query in
        ``[q_first, q_last]`` sees entirely (no mask needed there); segment ids aside."""
        full_lo: IntLike = lo
        if self.sliding_window is not None:
            full_lo = _max(lo, _cdiv(_max(q_last - self.sliding_window + 1, 0), block_kv))
        full_hi = _floordiv(_max(kv_len, 0), block_kv)
        if self.causal:
            full_hi = _min(full_hi, _floordiv(_max(q_first + 1, 0), block_kv))
        return _clamp_sub_range(full_lo, full_hi, lo, hi)

    def full_q_block_range(
        self, kv_first: IntLike, kv_last: IntLike, kv_len: IntLike, block_q: int, lo, hi
    ) -> tuple[IntLike, IntLike]:
        """Sub-range of the query blocks ``[lo, hi)`` that see every key in
        ``[kv_first, kv_last]`` (no mask needed there); segment ids aside."""
        full_lo: IntLike = lo
        if self.causal:
            full_lo = _max(lo, _cdiv(_max(kv_last - self.q_offset, 0), block_q))
        full_hi: IntLike = hi
        if self.sliding_window is not None:
            # Last query row r with r + q_offset - kv_first < window.
            rows = _max(kv_first + self.sliding_window - self.q_offset, 0)
            full_hi = _min(hi, _floordiv(rows, block_q))
        full_hi = _select(kv_last < kv_len, full_hi, 0)
        return _clamp_sub_range(full_lo, full_hi, lo, hi)

    def q_block_range(
        self, kv_first: IntLike, kv_last: IntLike, kv_len: IntLike, sq: int, block_q: int
    ) -> tuple[IntLike, IntLike]:
        """Half-open range of query blocks that can see keys ``[kv_first, kv_last]``."""
        lo_row = _min(_max(kv_first - self.q_offset, 0), sq) if self.causal else 0
        hi_row: IntLike = sq
        if self.sliding_window is not None:
            last_key = _min(kv_last, kv_len - 1)
            window_hi = _max(_min(last_key + self.sliding_window - self.q_offset, sq), 0)
            if self.num_sink_tokens:
                window_hi = _select(kv_first < self.num_sink_tokens, sq, window_hi)
            hi_row = window_hi
        # A block made only of padding keys is seen by nobody.
        hi_row = _select(kv_first < kv_len, hi_row, 0)
        lo = _floordiv(lo_row, block_q)
        hi = _select(lo_row < hi_row, _max(_cdiv(hi_row, block_q), lo), lo)
        return lo, hi


def nth_block(
    ranges: tuple[tuple[IntLike, IntLike], ...], t: IntLike
) -> tuple[jax.Array, jax.Array]:
    """The ``t``-th block index of the concatenated half-open ``ranges``.

    Returns ``(block, valid)``. Past the end, ``block`` repeats the last block of
    the last non-empty range (0 if all are empty) and ``valid`` is False, so a
    pipelined grid step re-uses the previous copy and does no work.
    """
    block, last, start = jnp.int32(0), jnp.int32(0), 0
    for lo, hi in ranges:
        size = jnp.maximum(hi - lo, 0)
        in_range = (t >= start) & (t < start + size)
        block = jnp.where(in_range, lo + t - start, block)
        last = jnp.where(size > 0, hi - 1, last)
        start = start + size
    valid = t < start
    return jnp.where(valid, block, last), valid


def segment_visible(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """``[..., tq, tk]`` mask: a query sees only keys of its own segment."""
    return q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)``; identity when ``cap`` is None."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)
