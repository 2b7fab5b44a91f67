"""Flash attention for GPU: Pallas Triton forward, dK/dV and dQ kernels with a custom VJP.

Shapes: ``q: [b, sq, hq, d]``, ``k, v: [b, skv, hkv, d]``, group ``g = hq // hkv``;
query head ``h`` reads kv head ``h // g`` through the BlockSpec index map, so K/V
are never repeated. Sequences are zero-padded to block multiples here and the
padded keys masked (``kv_pos < skv``); ``d`` is padded to a power of two in the
tiles only (masked loads/stores), as Triton requires power-of-two tensors.

Forward (FlashAttention-2), one program per (q block, batch, query head); logits
are kept in base 2 (``s2 = s * log2 e``) so every exponential is an ``exp2``::

    for key block j in sink blocks, then window blocks (masks.kv_block_ranges):
        s   = soft_cap(q @ k_j^T * scale), masked to -inf          [bq, bk]
        m'  = max(m, rowmax(s2));  p = exp2(s2 - m')
        l   = l * exp2(m - m') + rowsum(p);  acc = acc * exp2(m - m') + p @ v_j
    o = acc / l;  lse2 = m + log2(l)                 (rows seeing nothing: o = 0)

Backward, with ``delta = rowsum(do * o)`` and ``p = exp2(s2 - lse2)``::

    dp = do @ v^T;  ds = p * (dp - delta) * (1 - tanh^2) [soft cap only]
    dK/dV kernel, one program per (kv block, batch, kv head); loops over the g query
    heads of its group and the q blocks that see it (masks.q_block_range):
        dv += p^T @ do;  dk += ds^T @ q * scale
    dQ kernel, one program per (q block, batch, query head), same blocks as forward:
        dq += ds @ k * scale

Fully masked blocks are never visited: structural masks bound the loops, and
with segment ids a block whose tile mask is all False skips both matmuls.
Blocks every row sees entirely (``masks.full_kv_block_range``) run in a loop of
their own without computing a mask; only the boundary blocks pay for it.

Tiles, warps and pipeline stages of the three kernels come from ``TILE_TABLE``, by
head_dim and element size (:func:`block_sizes`; ``block_q`` / ``block_kv`` override).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.blocks import pad_seq, round_up, triton_table_key
from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec

_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # Triton dots need every dimension >= 16.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16) and launch parameters of one kernel."""

    block_q: int
    block_kv: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class _FlashGpuCall:
    """Static (hashable) parameters of one flash-attention call."""

    mask: MaskSpec
    scale: float
    logit_soft_cap: float | None
    kv_len: int  # keys at or past this index are padding
    head_dim: int
    fwd: BlockSizes
    dkv: BlockSizes
    dq: BlockSizes
    has_segments: bool
    interpret: bool

    @property
    def needs_mask(self) -> bool:
        m = self.mask
        return m.causal or m.sliding_window is not None or self.has_segments or self.padded

    @property
    def padded(self) -> bool:
        return self.kv_len % max(self.fwd.block_kv, self.dkv.block_kv, self.dq.block_kv) != 0


# (padded head_dim, bytes per element) -> (forward, dK/dV, dQ) launch parameters.
# Not measured on hardware: the values follow public tunings (jax's Pallas Triton `mha`,
# Triton's fused-attention tutorial, FlashAttention-2's per-head_dim launch templates) and
# are sized so every entry fits H100 (and A100) shared memory. docs/kernels.md ("Triton
# tile table") names the sources; tests/pallas_kernels/test_tiles.py states each entry's
# shared-memory estimate and fails if one exceeds the budget.
TILE_TABLE: dict[tuple[int, int], tuple[BlockSizes, BlockSizes, BlockSizes]] = {
    # bfloat16 / float16
    (64, 2): (BlockSizes(128, 64, 4, 3), BlockSizes(32, 128, 4, 3), BlockSizes(128, 32, 4, 3)),
    (128, 2): (BlockSizes(128, 64, 8, 2), BlockSizes(32, 128, 8, 2), BlockSizes(128, 32, 8, 2)),
    (256, 2): (BlockSizes(64, 32, 8, 2), BlockSizes(32, 64, 8, 2), BlockSizes(64, 32, 8, 2)),
    # float32 (and wider)
    (64, 4): (BlockSizes(64, 64, 4, 2), BlockSizes(32, 64, 4, 2), BlockSizes(64, 32, 4, 2)),
    (128, 4): (BlockSizes(64, 32, 8, 2), BlockSizes(32, 64, 8, 2), BlockSizes(64, 32, 8, 2)),
    (256, 4): (BlockSizes(64, 16, 8, 2), BlockSizes(16, 32, 8, 2), BlockSizes(32, 16, 4, 2)),
}


def default_block_sizes(
    head_dim: int, dtype: jnp.dtype
) -> tuple[BlockSizes, BlockSizes, BlockSizes]:
    """(forward, dK/dV, dQ) launch parameters of ``TILE_TABLE`` for ``head_dim`` and ``dtype``.

    Raises:
      ValueError: ``head_dim > 256`` (:func:`blocks.triton_table_key`).
    """
    return TILE_TABLE[triton_table_key(head_dim, dtype)]


def block_sizes(
    head_dim: int,
    dtype: jnp.dtype,
    seq_q: int,
    seq_kv: int,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> tuple[BlockSizes, BlockSizes, BlockSizes]:
    """The (forward, dK/dV, dQ) launch parameters one call runs with.

    ``block_q`` / ``block_kv`` replace the table's tiles in all three kernels (warps and
    stages stay the table's); every tile then shrinks to the power-of-two rounded sequence.

    Raises:
      ValueError: an override that is not a power of two >= 16, or ``head_dim > 256``.
    """
    _check_block("block_q", block_q)
    _check_block("block_kv", block_kv)
    return tuple(
        dataclasses.replace(
            t,
            block_q=_fit(block_q or t.block_q, seq_q),
            block_kv=_fit(block_kv or t.block_kv, seq_kv),
        )
        for t in default_block_sizes(head_dim, dtype)
    )


def _fit(block: int, seq: int) -> int:
    """Shrink a tile to the (power-of-two rounded) sequence, never below 16."""
    return max(_MIN_BLOCK, min(block, pl.next_power_of_2(seq)))


def _check_block(name: str, block: int | None) -> None:
    if block is not None and (block < _MIN_BLOCK or block & (block - 1)):
        raise ValueError(
            f"{name} must be a power of two >= {_MIN_BLOCK} for the Triton kernel, got {block}."
        )


# ---------------------------------------------------------------------------
# Tile math shared by the three kernels.
# ---------------------------------------------------------------------------


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b^T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^T @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _load(ref, head_dim: int) -> jax.Array:
    """Load a ``[rows, d_pad]`` tile, zero-filling the padded head-dim columns."""
    d_pad = ref.shape[-1]
    if d_pad == head_dim:
        return ref[...]
    return plgpu.load(ref, mask=(jnp.arange(d_pad) < head_dim)[None, :], other=0.0)


def _store(ref, value: jax.Array, head_dim: int) -> None:
    d_pad = ref.shape[-1]
    value = value.astype(ref.dtype)
    if d_pad == head_dim:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=(jnp.arange(d_pad) < head_dim)[None, :])


def _logits(cfg: _FlashGpuCall, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Scaled, soft-capped logits ``[tq, tk]`` and ``d(capped)/d(raw)`` (None without cap)."""
    s = _dot_nt(q, k) * cfg.scale
    if cfg.logit_soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.logit_soft_cap)
    return cfg.logit_soft_cap * t, 1.0 - t * t


def _tile_mask(cfg: _FlashGpuCall, masked: bool, q_row0, kv0, shape, q_seg, kv_seg):
    """Visibility of one ``[tq, tk]`` tile, or None for a tile known to be fully visible."""
    if not masked:
        return None
    visible = cfg.mask.block_visible(q_row0, kv0, shape, cfg.kv_len)
    if q_seg is not None:
        visible = visible & (q_seg[:, None] == kv_seg[None, :])
    return visible


def _skip_if_empty(visible: jax.Array | None, has_segments: bool, compute, carry):
    """Run ``compute(carry)`` unless segment ids mask the whole tile."""
    if not has_segments:
        return compute(carry)
    any_visible = jnp.max(visible.astype(jnp.int32)) > 0
    return lax.cond(any_visible, compute, lambda c: c, carry)


def _loop_masked_then_full(cfg: _FlashGpuCall, ranges, full, body, carry):
    """``body(i, carry, masked=...)`` over the blocks of ``ranges``; blocks inside
    ``full`` (seen entirely by every row) run without a mask."""
    masked = functools.partial(body, masked=cfg.needs_mask)
    *partial_ranges, (lo, hi) = ranges
    for r_lo, r_hi in partial_ranges:
        carry = lax.fori_loop(r_lo, r_hi, masked, carry)
    if not cfg.needs_mask or cfg.has_segments:
        return lax.fori_loop(lo, hi, masked, carry)
    full_lo, full_hi = full
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, masked, carry)


def _visit_kv_blocks(cfg: _FlashGpuCall, q_row0, block_q: int, block_kv: int, body, carry):
    """Run ``body(j, carry, masked=...)`` over the key blocks rows ``[q_row0, +block_q)`` see."""
    first = q_row0 + cfg.mask.q_offset
    last = first + block_q - 1
    sinks, (lo, hi) = cfg.mask.kv_block_ranges(first, last, cfg.kv_len, block_kv)
    full = cfg.mask.full_kv_block_range(first, last, cfg.kv_len, block_kv, lo, hi)
    ranges = ((sinks,) if cfg.mask.num_sink_tokens else ()) + ((lo, hi),)
    return _loop_masked_then_full(cfg, ranges, full, body, carry)


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *, cfg: _FlashGpuCall):
    # q_ref: [bq, dp]  k_ref, v_ref: [skv, dp]  qseg_ref: [bq]  kvseg_ref: [skv]
    # o_ref: [bq, dp]  lse_ref: [bq]
    bq, bk = cfg.fwd.block_q, cfg.fwd.block_kv
    q_row0 = pl.program_id(0) * bq
    q = _load(q_ref, cfg.head_dim)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry, masked: bool):
        kv = pl.ds(j * bk, bk)
        kv_seg = None if kvseg_ref is None else kvseg_ref[kv]
        visible = _tile_mask(cfg, masked, q_row0, j * bk, (bq, bk), q_seg, kv_seg)

        def compute(carry):
            acc, m, l_sum = carry
            s, _ = _logits(cfg, q, _load(k_ref.at[kv, :], cfg.head_dim))
            if visible is not None:
                s = jnp.where(visible, s, -jnp.inf)
            s2 = s * _LOG2E
            m_new = jnp.maximum(m, jnp.max(s2, axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s2 - m_new[:, None])
            v = _load(v_ref.at[kv, :], cfg.head_dim)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, l_sum * alpha + jnp.sum(p, axis=1)

        return _skip_if_empty(visible, cfg.has_segments, compute, carry)

    init = (
        jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l_sum = _visit_kv_blocks(cfg, q_row0, bq, bk, body, init)
    l_safe = jnp.where(l_sum == 0.0, 1.0, l_sum)  # rows that saw no key: acc == 0 -> o == 0
    _store(o_ref, acc / l_safe[:, None], cfg.head_dim)
    lse_ref[...] = m + jnp.log2(l_safe)


def _dkv_kernel(
    q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, cfg: _FlashGpuCall,
):  # fmt: skip
    # q_ref, do_ref: [sq, g, dp]  lse_ref, delta_ref: [g, sq]  qseg_ref: [sq]
    # k_ref, v_ref, dk_ref, dv_ref: [bk, dp]  kvseg_ref: [bk]
    bq, bk = cfg.dkv.block_q, cfg.dkv.block_kv
    sq, groups = q_ref.shape[0], q_ref.shape[1]
    kv0 = pl.program_id(0) * bk
    k = _load(k_ref, cfg.head_dim)
    v = _load(v_ref, cfg.head_dim)
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    lo, hi = cfg.mask.q_block_range(kv0, kv0 + bk - 1, cfg.kv_len, sq, bq)
    full = cfg.mask.full_q_block_range(kv0, kv0 + bk - 1, cfg.kv_len, bq, lo, hi)

    def head_body(hh, carry):
        def q_body(i, carry, masked: bool):
            rows = pl.ds(i * bq, bq)
            q_seg = None if qseg_ref is None else qseg_ref[rows]
            visible = _tile_mask(cfg, masked, i * bq, kv0, (bq, bk), q_seg, kv_seg)

            def compute(carry):
                dk, dv = carry
                q = _load(q_ref.at[rows, hh, :], cfg.head_dim)
                do = _load(do_ref.at[rows, hh, :], cfg.head_dim)
                s, dcap = _logits(cfg, q, k)
                if visible is not None:
                    s = jnp.where(visible, s, -jnp.inf)
                p = jnp.exp2(s * _LOG2E - lse_ref[hh, rows][:, None])  # [bq, bk]
                dv = dv + _dot_tn(p.astype(do.dtype), do)
                ds = p * (_dot_nt(do, v) - delta_ref[hh, rows][:, None])
                if dcap is not None:
                    ds = ds * dcap
                return dk + _dot_tn(ds.astype(q.dtype), q), dv

            return _skip_if_empty(visible, cfg.has_segments, compute, carry)

        return _loop_masked_then_full(cfg, ((lo, hi),), full, q_body, carry)

    zeros = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head_body, (zeros, zeros))
    _store(dk_ref, dk * cfg.scale, cfg.head_dim)
    _store(dv_ref, dv, cfg.head_dim)


def _dq_kernel(
    q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, cfg: _FlashGpuCall,
):  # fmt: skip
    # q_ref, do_ref, dq_ref: [bq, dp]  lse_ref, delta_ref, qseg_ref: [bq]
    # k_ref, v_ref: [skv, dp]  kvseg_ref: [skv]
    bq, bk = cfg.dq.block_q, cfg.dq.block_kv
    q_row0 = pl.program_id(0) * bq
    q = _load(q_ref, cfg.head_dim)
    do = _load(do_ref, cfg.head_dim)
    lse2 = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq, masked: bool):
        kv = pl.ds(j * bk, bk)
        kv_seg = None if kvseg_ref is None else kvseg_ref[kv]
        visible = _tile_mask(cfg, masked, q_row0, j * bk, (bq, bk), q_seg, kv_seg)

        def compute(dq):
            k = _load(k_ref.at[kv, :], cfg.head_dim)
            s, dcap = _logits(cfg, q, k)
            if visible is not None:
                s = jnp.where(visible, s, -jnp.inf)
            p = jnp.exp2(s * _LOG2E - lse2)
            ds = p * (_dot_nt(do, _load(v_ref.at[kv, :], cfg.head_dim)) - delta)
            if dcap is not None:
                ds = ds * dcap
            return dq + _dot(ds.astype(k.dtype), k)

        return _skip_if_empty(visible, cfg.has_segments, compute, dq)

    dq = _visit_kv_blocks(cfg, q_row0, bq, bk, body, jnp.zeros(q.shape, jnp.float32))
    _store(dq_ref, dq * cfg.scale, cfg.head_dim)


# ---------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded to block multiples).
# ---------------------------------------------------------------------------


def _params(blocks: BlockSizes) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(cfg: _FlashGpuCall, q, k, v, q_seg, kv_seg):
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    groups, dp = hq // hkv, pl.next_power_of_2(d)
    bq = cfg.fwd.block_q
    kv_head = lambda h: lax.div(h, groups)
    o, lse2 = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(sq // bq, b, hq),
        in_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, n, h: (n, i, h, 0)),
            pl.BlockSpec((None, skv, None, dp), lambda i, n, h: (n, 0, kv_head(h), 0)),
            pl.BlockSpec((None, skv, None, dp), lambda i, n, h: (n, 0, kv_head(h), 0)),
            None if q_seg is None else pl.BlockSpec((None, bq), lambda i, n, h: (n, i)),
            None if kv_seg is None else pl.BlockSpec((None, skv), lambda i, n, h: (n, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, n, h: (n, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
        ],
        compiler_params=_params(cfg.fwd),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(q, k, v, q_seg, kv_seg)
    return o, lse2


def _backward(cfg: _FlashGpuCall, q, k, v, q_seg, kv_seg, o, lse2, do):
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    groups, dp = hq // hkv, pl.next_power_of_2(d)
    # delta_i = sum_d do * o (= rowsum(p * dp)); an XLA reduction, memory bound.
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), o.astype(jnp.float32))

    bq, bk = cfg.dkv.block_q, cfg.dkv.block_kv
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(skv // bk, b, hkv),
        in_specs=[
            pl.BlockSpec((None, sq, groups, dp), lambda j, n, h: (n, 0, h, 0)),
            pl.BlockSpec((None, bk, None, dp), lambda j, n, h: (n, j, h, 0)),
            pl.BlockSpec((None, bk, None, dp), lambda j, n, h: (n, j, h, 0)),
            None if q_seg is None else pl.BlockSpec((None, sq), lambda j, n, h: (n, 0)),
            None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, n, h: (n, j)),
            pl.BlockSpec((None, sq, groups, dp), lambda j, n, h: (n, 0, h, 0)),
            pl.BlockSpec((None, groups, sq), lambda j, n, h: (n, h, 0)),
            pl.BlockSpec((None, groups, sq), lambda j, n, h: (n, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, dp), lambda j, n, h: (n, j, h, 0)),
            pl.BlockSpec((None, bk, None, dp), lambda j, n, h: (n, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg.dkv),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(q, k, v, q_seg, kv_seg, do, lse2, delta)

    bq, bk = cfg.dq.block_q, cfg.dq.block_kv
    kv_head = lambda h: lax.div(h, groups)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(sq // bq, b, hq),
        in_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, n, h: (n, i, h, 0)),
            pl.BlockSpec((None, skv, None, dp), lambda i, n, h: (n, 0, kv_head(h), 0)),
            pl.BlockSpec((None, skv, None, dp), lambda i, n, h: (n, 0, kv_head(h), 0)),
            None if q_seg is None else pl.BlockSpec((None, bq), lambda i, n, h: (n, i)),
            None if kv_seg is None else pl.BlockSpec((None, skv), lambda i, n, h: (n, 0)),
            pl.BlockSpec((None, bq, None, dp), lambda i, n, h: (n, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda i, n, h: (n, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg.dq),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q, k, v, q_seg, kv_seg, do, lse2, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _FlashGpuCall, q, k, v, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg: _FlashGpuCall, q, k, v, q_seg, kv_seg):
    o, lse2 = _forward(cfg, q, k, v, q_seg, kv_seg)
    return o, (q, k, v, q_seg, kv_seg, o, lse2)


def _flash_bwd(cfg: _FlashGpuCall, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse2 = residuals
    dq, dk, dv = _backward(cfg, q, k, v, q_seg, kv_seg, o, lse2, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _setup(q, k, q_segment_ids, kv_segment_ids, options: dict):
    """The call's config, padded lengths and int32 segment ids."""
    sq, skv = q.shape[1], k.shape[1]
    tiles = block_sizes(
        q.shape[-1], q.dtype, sq, skv, options.get("block_q"), options.get("block_kv")
    )
    cfg = _FlashGpuCall(
        mask=options["mask"],
        scale=options["scale"],
        logit_soft_cap=options["logit_soft_cap"],
        kv_len=skv,
        head_dim=q.shape[-1],
        fwd=tiles[0],
        dkv=tiles[1],
        dq=tiles[2],
        has_segments=q_segment_ids is not None,
        interpret=options.get("interpret", False),
    )
    sq_pad = round_up(sq, max(t.block_q for t in tiles))
    skv_pad = round_up(skv, max(t.block_kv for t in tiles))
    if q_segment_ids is not None:
        q_segment_ids = pad_seq(q_segment_ids.astype(jnp.int32), sq_pad)
        kv_segment_ids = pad_seq(kv_segment_ids.astype(jnp.int32), skv_pad)
    return cfg, sq_pad, skv_pad, q_segment_ids, kv_segment_ids


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    mask: MaskSpec,
    scale: float,
    logit_soft_cap: float | None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Flash attention with the Triton kernels; differentiable in q, k, v.

    Args:
      q: ``[b, sq, hq, d]``; k, v: ``[b, skv, hkv, d]`` (inputs already validated).
      q_segment_ids, kv_segment_ids: ``[b, sq]`` / ``[b, skv]`` int, both or neither.
      mask: structural mask (causal / window / sinks, query offset).
      scale: logit scale; logit_soft_cap: cap or None.
      block_q, block_kv: one tile for all three kernels (powers of two >= 16);
        None = ``TILE_TABLE`` (:func:`block_sizes`).
      interpret: run the kernels in Pallas interpret mode (CPU testing).

    Returns:
      ``[b, sq, hq, d]`` in ``q.dtype``.
    """
    options = dict(mask=mask, scale=scale, logit_soft_cap=logit_soft_cap, block_q=block_q,
                   block_kv=block_kv, interpret=interpret)  # fmt: skip
    cfg, sq_pad, skv_pad, q_seg, kv_seg = _setup(q, k, q_segment_ids, kv_segment_ids, options)
    o = _flash(cfg, pad_seq(q, sq_pad), pad_seq(k, skv_pad), pad_seq(v, skv_pad), q_seg, kv_seg)
    return o[:, : q.shape[1]]


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """The forward kernel with its log-sum-exp, for callers that merge partial results over
    key blocks (context-parallel attention); not differentiable.

    Args: as :func:`flash_attention` (``options``: its keyword arguments).

    Returns:
      ``(o, lse)``: ``o [b, sq, hq, d]`` in ``q.dtype``; ``lse [b, sq, hq]`` float32, the
      natural log-sum-exp of each row's logits, ``MASK_VALUE`` where a row sees no key.
    """
    cfg, sq_pad, skv_pad, q_seg, kv_seg = _setup(q, k, q_segment_ids, kv_segment_ids, options)
    o, lse2 = _forward(
        cfg, pad_seq(q, sq_pad), pad_seq(k, skv_pad), pad_seq(v, skv_pad), q_seg, kv_seg
    )
    sq = q.shape[1]
    lse = jnp.where(lse2 > 0.5 * MASK_VALUE, lse2 / _LOG2E, MASK_VALUE)
    return o[:, :sq], lse[:, :, :sq].transpose(0, 2, 1)


def flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    **options,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` of this call's keys given the final ``o`` and ``lse`` of each row,
    which may have seen more keys than this call does (the flash backward restricted to
    them: ``p = exp(s - lse)``, ``delta = rowsum(do * o)``).

    Args: q ... kv_segment_ids and ``options`` as :func:`flash_attention`; ``o`` and ``do``
      ``[b, sq, hq, d]`` (``do`` is cast to ``q.dtype``); ``lse`` ``[b, sq, hq]`` float32 as
      :func:`flash_forward` returns it.

    Returns:
      dq, dk, dv in the dtypes of q, k, v.
    """
    cfg, sq_pad, skv_pad, q_seg, kv_seg = _setup(q, k, q_segment_ids, kv_segment_ids, options)
    lse2 = jnp.where(lse > 0.5 * MASK_VALUE, lse * _LOG2E, MASK_VALUE).transpose(0, 2, 1)
    # padded query rows: do = 0, and p = exp2(s2 - huge) = 0, so they add nothing
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, sq_pad - q.shape[1])), constant_values=-MASK_VALUE)
    dq, dk, dv = _backward(
        cfg,
        pad_seq(q, sq_pad), pad_seq(k, skv_pad), pad_seq(v, skv_pad), q_seg, kv_seg,
        pad_seq(o, sq_pad), lse2, pad_seq(do.astype(q.dtype), sq_pad),
    )  # fmt: skip
    return dq[:, : q.shape[1]], dk[:, : k.shape[1]], dv[:, : k.shape[1]]
