"""Flash attention for TPU: Pallas Mosaic forward, dK/dV and dQ kernels with a custom VJP.

Shapes: ``q: [b, sq, hq, d]``, ``k, v: [b, skv, hkv, d]``, group ``g = hq // hkv``.
Mosaic tiles the last two block dims in (8, 128) units, so each head is
presented as a ``[rows, d]`` tile: with ``d % 128 == 0`` by a free reshape to
``[b, s, h * d]`` (block ``(rows, d)`` at column block ``h``), otherwise by a
transpose to ``[b, h, s, d]``. Query head ``h`` reads kv head ``h // g`` in the
index map (no repeated K/V). Sequences are zero-padded to tile multiples
(multiples of 128) and padded keys masked.

The key axis is the innermost, sequential grid axis, with the running
``(m, l, acc)`` in VMEM scratch. It has only as many steps as the widest query
block can see (sink blocks, then window blocks; ``masks.kv_block_ranges``):
step ``t`` of query block ``i`` maps to its ``t``-th visible key block, later
steps repeat the last block index (the pipeline skips the copy) and do no work.
With segment ids, per-block id ranges are scalar-prefetched and a step whose
ranges do not overlap is skipped as well. Forward::

    s = soft_cap(q k_j^T * scale), masked -> -inf;  m' = max(m, rowmax(s))
    p = exp(s - m');  l = l e^(m - m') + rowsum(p);  acc = acc e^(m - m') + p v_j
    o = acc / l;  lse = m + log l                      (rows seeing nothing: o = 0)

Backward (``delta = rowsum(do * o)``, ``p = exp(s - lse)``,
``ds = p * (do v^T - delta) * (1 - tanh^2)`` [cap only]):

* dK/dV: grid (batch, kv head, kv block, g x visible q blocks), transposed tiles
  ``s^T = k q^T [bk, bq]`` so per-query rows ``lse, delta`` stay lane-major:
  ``dv += p^T do;  dk += ds^T q * scale``.
* dQ: same grid as the forward: ``dq += ds k * scale``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.blocks import pad_seq, round_up
from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec, nth_block

_LANES = 128


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Query / key tile sizes (multiples of 128) of one kernel."""

    block_q: int
    block_kv: int


@dataclasses.dataclass(frozen=True)
class _FlashTpuCall:
    """Static (hashable) parameters of one call."""

    mask: MaskSpec
    scale: float
    logit_soft_cap: float | None
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    fwd: Tiles
    dkv: Tiles
    dq: Tiles
    has_segments: bool
    padded: bool
    interpret: bool

    @property
    def groups(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def lane_dense(self) -> bool:
        return self.head_dim % _LANES == 0

    @property
    def needs_mask(self) -> bool:
        m = self.mask
        return m.causal or m.sliding_window is not None or self.has_segments or self.padded


DEFAULT_TILES = (Tiles(512, 512), Tiles(512, 256), Tiles(256, 512))
"""(forward, dK/dV, dQ) defaults, sized for v5e/v6e VMEM (not yet tuned on hardware)."""


# ---------------------------------------------------------------------------
# Layout: [b, s, h, d] <-> the array the kernels read, and its BlockSpecs.
# ---------------------------------------------------------------------------


def _to_kernel(x: jax.Array) -> jax.Array:
    b, s, h, d = x.shape
    return x.reshape(b, s, h * d) if d % _LANES == 0 else x.transpose(0, 2, 1, 3)


def _from_kernel(x: jax.Array, cfg: _FlashTpuCall) -> jax.Array:
    if cfg.lane_dense:
        return x.reshape(x.shape[0], x.shape[1], -1, cfg.head_dim)
    return x.transpose(0, 2, 1, 3)


def _head_spec(cfg: _FlashTpuCall, rows: int, index: Callable) -> pl.BlockSpec:
    """``[rows, d]`` tile of one head; ``index(*grid, *prefetch) -> (batch, head, row_block)``."""
    if cfg.lane_dense:
        return pl.BlockSpec(
            (None, rows, cfg.head_dim), lambda *a: (lambda n, h, r: (n, r, h))(*index(*a))
        )
    return pl.BlockSpec(
        (None, None, rows, cfg.head_dim), lambda *a: (lambda n, h, r: (n, h, r, 0))(*index(*a))
    )


def _row_spec(rows: int, index: Callable) -> pl.BlockSpec:
    """``[1, rows]`` lane-major slice of a per-head row array ``[b, h, 1, s]``."""
    return pl.BlockSpec(
        (None, None, 1, rows), lambda *a: (lambda n, h, r: (n, h, 0, r))(*index(*a))
    )


def _seg_spec(rows: int, index: Callable) -> pl.BlockSpec:
    """``[1, rows]`` slice of segment ids stored as ``[b, 1, s]``."""
    return pl.BlockSpec((None, 1, rows), lambda *a: (lambda n, r: (n, 0, r))(*index(*a)))


def _segment_bounds(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-block ``(min, max)`` segment id, ``[b, s // block]`` each (scalar-prefetched)."""
    blocks = ids.reshape(ids.shape[0], -1, block)
    return blocks.min(axis=-1), blocks.max(axis=-1)


# ---------------------------------------------------------------------------
# Grid-step -> block bookkeeping (used by kernels and index maps alike).
# ---------------------------------------------------------------------------


def _kv_step(cfg: _FlashTpuCall, tiles: Tiles, i, t):
    """Key block visited at step ``t`` of query block ``i``, and whether it is real work."""
    first = i * tiles.block_q + cfg.mask.q_offset
    ranges = cfg.mask.kv_block_ranges(first, first + tiles.block_q - 1, cfg.kv_len, tiles.block_kv)
    return nth_block(ranges, t)


def _q_step(cfg: _FlashTpuCall, tiles: Tiles, sq: int, j, u):
    """Query block visited at step ``u`` of key block ``j``, and whether it is real work."""
    kv0 = j * tiles.block_kv
    lo_hi = cfg.mask.q_block_range(kv0, kv0 + tiles.block_kv - 1, cfg.kv_len, sq, tiles.block_q)
    return nth_block((lo_hi,), u)


def _num_kv_steps(cfg: _FlashTpuCall, tiles: Tiles, sq: int) -> int:
    counts = []
    for i in range(sq // tiles.block_q):
        first = i * tiles.block_q + cfg.mask.q_offset
        (slo, shi), (lo, hi) = cfg.mask.kv_block_ranges(
            first, first + tiles.block_q - 1, cfg.kv_len, tiles.block_kv
        )
        counts.append(shi - slo + hi - lo)
    return max(1, *counts)


def _num_q_steps(cfg: _FlashTpuCall, tiles: Tiles, sq: int, skv: int) -> int:
    counts = []
    for j in range(skv // tiles.block_kv):
        kv0 = j * tiles.block_kv
        lo, hi = cfg.mask.q_block_range(
            kv0, kv0 + tiles.block_kv - 1, cfg.kv_len, sq, tiles.block_q
        )
        counts.append(hi - lo)
    return max(1, *counts)


def _segments_overlap(bounds, n, i, j):
    """True unless query block ``i`` and key block ``j`` share no segment id."""
    q_min, q_max, kv_min, kv_max = bounds
    return (q_max[n, i] >= kv_min[n, j]) & (q_min[n, i] <= kv_max[n, j])


# ---------------------------------------------------------------------------
# Tile math.
# ---------------------------------------------------------------------------

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _logits(cfg: _FlashTpuCall, a: jax.Array, b: jax.Array):
    """``soft_cap(a b^T * scale)`` and ``d(capped)/d(raw)`` (None without cap)."""
    s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.logit_soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.logit_soft_cap)
    return cfg.logit_soft_cap * t, 1.0 - t * t


def _mask(cfg: _FlashTpuCall, s, q_row0, kv0, q_seg, kv_seg, *, kv_major: bool = False):
    """``s`` with invisible entries set to -inf (``q_seg``/``kv_seg`` broadcast to ``s``)."""
    if not cfg.needs_mask:
        return s
    visible = cfg.mask.block_visible(q_row0, kv0, s.shape, cfg.kv_len, kv_major=kv_major)
    if q_seg is not None:
        visible = visible & (q_seg == kv_seg)
    return jnp.where(visible, s, -jnp.inf)


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """Widen a lane-replicated ``[rows, 128]`` statistic to ``[rows, n]``."""
    return jnp.tile(x, (1, pl.cdiv(n, _LANES)))[:, :n]


def _column(row_ref) -> jax.Array:
    """Read a ``[1, rows]`` row block as a ``[rows, 1]`` column."""
    return row_ref[0][:, None]


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _split_prefetch(cfg: _FlashTpuCall, refs):
    n = 4 if cfg.has_segments else 0
    return refs[:n], refs[n:]


def _fwd_kernel(*refs, cfg: _FlashTpuCall):
    # q_ref, o_ref: [bq, d]  k_ref, v_ref: [bk, d]  qseg_ref: [1, bq]  kvseg_ref: [1, bk]
    # lse_ref, m_sc, l_sc: [bq, 128]  acc_sc: [bq, d]
    bounds, refs = _split_prefetch(cfg, refs)
    q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    bq, bk = cfg.fwd.block_q, cfg.fwd.block_kv
    n, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    j, run = _kv_step(cfg, cfg.fwd, i, t)
    if bounds:
        run = run & _segments_overlap(bounds, n, i, j)

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(run)
    def _step():
        s, _ = _logits(cfg, q_ref[...], k_ref[...])
        q_seg = None if qseg_ref is None else _column(qseg_ref)
        kv_seg = None if kvseg_ref is None else kvseg_ref[...]
        s = _mask(cfg, s, i * bq, j * bk, q_seg, kv_seg)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [bq, 128]
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1)[:, None]
        m_sc[...] = m_next
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_sc[...] = _lanes(alpha, cfg.head_dim) * acc_sc[...] + pv

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        l_sum = l_sc[...]
        l_safe = jnp.where(l_sum == 0.0, 1.0, l_sum)  # rows that saw no key: acc == 0 -> o == 0
        o_ref[...] = (acc_sc[...] / _lanes(l_safe, cfg.head_dim)).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_safe)


def _dkv_kernel(*refs, cfg: _FlashTpuCall, sq: int, num_q_steps: int):
    # q_ref, do_ref: [bq, d]  k_ref, v_ref, dk_ref, dv_ref: [bk, d]
    # qseg_ref, lse_ref, delta_ref: [1, bq]  kvseg_ref: [1, bk]  dk_sc, dv_sc: [bk, d]
    bounds, refs = _split_prefetch(cfg, refs)
    (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref,
     dk_ref, dv_ref, dk_sc, dv_sc) = refs  # fmt: skip
    bq, bk = cfg.dkv.block_q, cfg.dkv.block_kv
    n, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i, run = _q_step(cfg, cfg.dkv, sq, j, lax.rem(t, num_q_steps))
    if bounds:
        run = run & _segments_overlap(bounds, n, i, j)

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(run)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t, dcap_t = _logits(cfg, k, q)  # [bk, bq]
        q_seg = None if qseg_ref is None else qseg_ref[...]
        kv_seg = None if kvseg_ref is None else _column(kvseg_ref)
        s_t = _mask(cfg, s_t, i * bq, j * bk, q_seg, kv_seg, kv_major=True)
        p_t = jnp.exp(s_t - lse_ref[...])
        dv_sc[...] += lax.dot_general(
            p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
        )
        dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])
        if dcap_t is not None:
            ds_t = ds_t * dcap_t
        dk_sc[...] += lax.dot_general(
            ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
        )

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _FlashTpuCall):
    # q_ref, do_ref, dq_ref, dq_sc: [bq, d]  k_ref, v_ref: [bk, d]
    # qseg_ref, lse_ref, delta_ref: [1, bq]  kvseg_ref: [1, bk]
    bounds, refs = _split_prefetch(cfg, refs)
    (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref,
     dq_ref, dq_sc) = refs  # fmt: skip
    bq, bk = cfg.dq.block_q, cfg.dq.block_kv
    n, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    j, run = _kv_step(cfg, cfg.dq, i, t)
    if bounds:
        run = run & _segments_overlap(bounds, n, i, j)

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(run)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, dcap = _logits(cfg, q, k)  # [bq, bk]
        q_seg = None if qseg_ref is None else _column(qseg_ref)
        kv_seg = None if kvseg_ref is None else kvseg_ref[...]
        s = _mask(cfg, s, i * bq, j * bk, q_seg, kv_seg)
        p = jnp.exp(s - _column(lse_ref))
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _column(delta_ref))
        if dcap is not None:
            ds = ds * dcap
        dq_sc[...] += lax.dot_general(
            ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32
        )

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call wrappers. Arrays are in kernel layout and padded; segment ids are
# [b, 1, s] int32; lse / delta are [b, hq, 1, sq] float32.
# ---------------------------------------------------------------------------


def _params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _prefetch(cfg: _FlashTpuCall, tiles: Tiles, q_seg, kv_seg) -> list[jax.Array]:
    if not cfg.has_segments:
        return []
    return [
        *_segment_bounds(q_seg[:, 0], tiles.block_q),
        *_segment_bounds(kv_seg[:, 0], tiles.block_kv),
    ]


def _forward(cfg: _FlashTpuCall, q, k, v, q_seg, kv_seg, sq: int):
    b = q.shape[0]
    bq, bk = cfg.fwd.block_q, cfg.fwd.block_kv
    g, hq, d = cfg.groups, cfg.num_q_heads, cfg.head_dim
    kv_block = lambda i, t: _kv_step(cfg, cfg.fwd, i, t)[0]
    kv_seg_index = lambda n, h, i, t, *_: (n, kv_block(i, t))
    prefetch = _prefetch(cfg, cfg.fwd, q_seg, kv_seg)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, hq, sq // bq, _num_kv_steps(cfg, cfg.fwd, sq)),
        in_specs=[
            _head_spec(cfg, bq, lambda n, h, i, t, *_: (n, h, i)),
            _head_spec(cfg, bk, lambda n, h, i, t, *_: (n, lax.div(h, g), kv_block(i, t))),
            _head_spec(cfg, bk, lambda n, h, i, t, *_: (n, lax.div(h, g), kv_block(i, t))),
            None if q_seg is None else _seg_spec(bq, lambda n, h, i, t, *_: (n, i)),
            None if kv_seg is None else _seg_spec(bk, kv_seg_index),
        ],
        out_specs=[
            _head_spec(cfg, bq, lambda n, h, i, t, *_: (n, h, i)),
            pl.BlockSpec((None, None, bq, _LANES), lambda n, h, i, t, *_: (n, h, i, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, _LANES), jnp.float32),
            pltpu.VMEM((bq, _LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, hq, sq, _LANES), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="flash_attention_fwd_tpu",
    )(*prefetch, q, k, v, q_seg, kv_seg)
    return o, lse[..., 0][:, :, None, :]  # lse: [b, hq, 1, sq]


def _backward(cfg: _FlashTpuCall, q, k, v, q_seg, kv_seg, o, lse, do, sq: int, skv: int):
    b = q.shape[0]
    g, hq, hkv, d = cfg.groups, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    spec = "bshd,bshd->bhs" if cfg.lane_dense else "bhsd,bhsd->bhs"
    delta = jnp.einsum(
        spec,
        _from_kernel(do, cfg).astype(jnp.float32) if cfg.lane_dense else do.astype(jnp.float32),
        _from_kernel(o, cfg).astype(jnp.float32) if cfg.lane_dense else o.astype(jnp.float32),
    )[:, :, None, :]  # [b, hq, 1, sq]

    bq, bk = cfg.dkv.block_q, cfg.dkv.block_kv
    nqs = _num_q_steps(cfg, cfg.dkv, sq, skv)
    q_block = lambda j, t: _q_step(cfg, cfg.dkv, sq, j, lax.rem(t, nqs))[0]
    q_head = lambda h, t: h * g + lax.div(t, nqs)
    prefetch = _prefetch(cfg, cfg.dkv, q_seg, kv_seg)
    q_index = lambda n, h, j, t, *_: (n, q_head(h, t), q_block(j, t))
    kv_index = lambda n, h, j, t, *_: (n, h, j)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, sq=sq, num_q_steps=nqs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, hkv, skv // bk, g * nqs),
            in_specs=[
                _head_spec(cfg, bq, q_index),
                _head_spec(cfg, bk, kv_index),
                _head_spec(cfg, bk, kv_index),
                None if q_seg is None else _seg_spec(bq, lambda n, h, j, t, *_: (n, q_block(j, t))),
                None if kv_seg is None else _seg_spec(bk, lambda n, h, j, t, *_: (n, j)),
                _head_spec(cfg, bq, q_index),
                _row_spec(bq, q_index),
                _row_spec(bq, q_index),
            ],
            out_specs=[_head_spec(cfg, bk, kv_index), _head_spec(cfg, bk, kv_index)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="flash_attention_dkv_tpu",
    )(*prefetch, q, k, v, q_seg, kv_seg, do, lse, delta)

    bq, bk = cfg.dq.block_q, cfg.dq.block_kv
    kv_block = lambda i, t: _kv_step(cfg, cfg.dq, i, t)[0]
    kv_seg_index = lambda n, h, i, t, *_: (n, kv_block(i, t))
    prefetch = _prefetch(cfg, cfg.dq, q_seg, kv_seg)
    q_index = lambda n, h, i, t, *_: (n, h, i)
    kv_index = lambda n, h, i, t, *_: (n, lax.div(h, g), kv_block(i, t))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, hq, sq // bq, _num_kv_steps(cfg, cfg.dq, sq)),
            in_specs=[
                _head_spec(cfg, bq, q_index),
                _head_spec(cfg, bk, kv_index),
                _head_spec(cfg, bk, kv_index),
                None if q_seg is None else _seg_spec(bq, lambda n, h, i, t, *_: (n, i)),
                None if kv_seg is None else _seg_spec(bk, kv_seg_index),
                _head_spec(cfg, bq, q_index),
                _row_spec(bq, q_index),
                _row_spec(bq, q_index),
            ],
            out_specs=_head_spec(cfg, bq, q_index),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="flash_attention_dq_tpu",
    )(*prefetch, q, k, v, q_seg, kv_seg, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _FlashTpuCall, q, k, v, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_seg, kv_seg, _seq_len(cfg, q))[0]


def _seq_len(cfg: _FlashTpuCall, x: jax.Array) -> int:
    return x.shape[1] if cfg.lane_dense else x.shape[2]


def _flash_fwd(cfg: _FlashTpuCall, q, k, v, q_seg, kv_seg):
    o, lse = _forward(cfg, q, k, v, q_seg, kv_seg, _seq_len(cfg, q))
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg: _FlashTpuCall, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    dq, dk, dv = _backward(
        cfg, q, k, v, q_seg, kv_seg, o, lse, do, _seq_len(cfg, q), _seq_len(cfg, k)
    )
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _fit(block: int, seq: int) -> int:
    return min(block, round_up(seq, _LANES))


def _setup(q, k, q_segment_ids, kv_segment_ids, options: dict):
    """The call's config, padded lengths and segment ids in the kernels' layout."""
    block_q, block_kv = options.get("block_q"), options.get("block_kv")
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block is not None and (block <= 0 or block % _LANES):
            raise ValueError(f"{name} must be a multiple of {_LANES} on TPU, got {block}.")
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    fwd, dkv, dq = (
        Tiles(_fit(block_q or t.block_q, sq), _fit(block_kv or t.block_kv, skv))
        for t in DEFAULT_TILES
    )
    sq_pad = round_up(sq, max(fwd.block_q, dkv.block_q, dq.block_q))
    skv_pad = round_up(skv, max(fwd.block_kv, dkv.block_kv, dq.block_kv))
    cfg = _FlashTpuCall(
        mask=options["mask"],
        scale=options["scale"],
        logit_soft_cap=options["logit_soft_cap"],
        kv_len=skv,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        fwd=fwd,
        dkv=dkv,
        dq=dq,
        has_segments=q_segment_ids is not None,
        padded=skv_pad != skv,
        interpret=options.get("interpret", False),
    )
    segs = (None, None)
    if q_segment_ids is not None:
        segs = (
            pad_seq(q_segment_ids.astype(jnp.int32), sq_pad)[:, None, :],
            pad_seq(kv_segment_ids.astype(jnp.int32), skv_pad)[:, None, :],
        )
    return cfg, sq_pad, skv_pad, segs


def _kernel_input(x: jax.Array, length: int) -> jax.Array:
    return _to_kernel(pad_seq(x, length))


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
    """Flash attention with the Mosaic TPU kernels; differentiable in q, k, v.

    Args:
      q: ``[b, sq, hq, d]``; k, v: ``[b, skv, hkv, d]`` (inputs already validated).
      q_segment_ids, kv_segment_ids: ``[b, sq]`` / ``[b, skv]`` int, both or neither.
      mask: structural mask (causal / window / sinks, query offset).
      scale: logit scale; logit_soft_cap: cap or None.
      block_q, block_kv: one tile for all three kernels, multiples of 128;
        None = :data:`DEFAULT_TILES`. Tiles shrink to the padded sequence.
      interpret: run the kernels in Pallas interpret mode (CPU testing).

    Returns:
      ``[b, sq, hq, d]`` in ``q.dtype``.
    """
    options = dict(mask=mask, scale=scale, logit_soft_cap=logit_soft_cap, block_q=block_q,
                   block_kv=block_kv, interpret=interpret)  # fmt: skip
    cfg, sq_pad, skv_pad, segs = _setup(q, k, q_segment_ids, kv_segment_ids, options)
    o = _flash(
        cfg,
        _kernel_input(q, sq_pad),
        _kernel_input(k, skv_pad),
        _kernel_input(v, skv_pad),
        *segs,
    )
    return _from_kernel(o, cfg)[:, : q.shape[1]]


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """The forward kernel with its log-sum-exp (as ``flash_gpu.flash_forward``).

    Returns:
      ``(o, lse)``: ``o [b, sq, hq, d]`` in ``q.dtype``; ``lse [b, sq, hq]`` float32,
      ``MASK_VALUE`` where a row sees no key.
    """
    cfg, sq_pad, skv_pad, segs = _setup(q, k, q_segment_ids, kv_segment_ids, options)
    o, lse = _forward(
        cfg,
        _kernel_input(q, sq_pad),
        _kernel_input(k, skv_pad),
        _kernel_input(v, skv_pad),
        *segs,
        sq_pad,
    )
    sq = q.shape[1]
    return _from_kernel(o, cfg)[:, :sq], lse[:, :, 0, :sq].transpose(0, 2, 1)


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
    """``(dq, dk, dv)`` of this call's keys given each row's final ``o`` and ``lse`` (as
    ``flash_gpu.flash_backward``)."""
    cfg, sq_pad, skv_pad, segs = _setup(q, k, q_segment_ids, kv_segment_ids, options)
    sq, skv = q.shape[1], k.shape[1]
    # padded query rows: do = 0, and p = exp(s - huge) = 0, so they add nothing
    lse = jnp.pad(lse.transpose(0, 2, 1), ((0, 0), (0, 0), (0, sq_pad - sq)),
                  constant_values=-MASK_VALUE)[:, :, None, :]  # fmt: skip
    dq, dk, dv = _backward(
        cfg,
        _kernel_input(q, sq_pad), _kernel_input(k, skv_pad), _kernel_input(v, skv_pad),
        *segs,
        _kernel_input(o.astype(q.dtype), sq_pad), lse,
        _kernel_input(do.astype(q.dtype), sq_pad),
        sq_pad, skv_pad,
    )  # fmt: skip
    return (
        _from_kernel(dq, cfg)[:, :sq],
        _from_kernel(dk, cfg)[:, :skv],
        _from_kernel(dv, cfg)[:, :skv],
    )
