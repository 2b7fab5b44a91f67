"""Block bookkeeping of masks.py against brute force over the element mask: the
kernels skip every block these helpers leave out, and drop the mask on every
block they call full, so both must be exact (or conservative)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention.masks import MaskSpec, nth_block


def _specs():
    rng = np.random.default_rng(0)
    for _ in range(60):
        sq, skv = (int(x) for x in rng.integers(1, 70, 2))
        causal = bool(rng.integers(2))
        window = None if rng.integers(3) == 0 else int(rng.integers(1, 40))
        sinks = int(rng.integers(0, 6))
        spec = MaskSpec.for_attention(
            sq, skv, causal=causal, sliding_window=window, num_sink_tokens=sinks
        )
        bq, bk = (int(x) for x in rng.choice([4, 8, 16], 2))
        kv_len = skv - int(rng.integers(0, min(skv, 5)))  # some padding keys
        yield spec, sq, skv, kv_len, bq, bk


def _visible(spec, sq, skv, kv_len):
    rows = np.arange(sq)[:, None] + spec.q_offset
    return np.broadcast_to(spec.visible(rows, np.arange(skv)[None, :], kv_len), (sq, skv))


def _tiles(vis, bq, bk):
    """``(any, all)`` of every ``[bq, bk]`` tile of a padded element mask."""
    nq, nk = vis.shape[0] // bq, vis.shape[1] // bk
    tiles = vis.reshape(nq, bq, nk, bk)
    return tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))


def _blocks(ranges):
    return [j for lo, hi in ranges for j in range(lo, hi)]


@pytest.mark.parametrize("traced", [False, True], ids=["python-ints", "traced"])
def test_kv_block_ranges_cover_exactly_the_visible_blocks(traced):
    for spec, sq, skv, kv_len, bq, bk in _specs():
        vis = _visible(spec, -(-sq // bq) * bq, -(-skv // bk) * bk, kv_len)
        tile_any, tile_all = _tiles(vis, bq, bk)
        for i in range(-(-sq // bq)):
            first = i * bq + spec.q_offset
            args = (first, first + bq - 1, kv_len)
            if traced:  # jnp scalars take the jnp code path, as program ids do in kernels
                args = tuple(jnp.int32(a) for a in args)
            ranges = spec.kv_block_ranges(*args, bk)
            full = spec.full_kv_block_range(*args, bk, *ranges[1])
            ranges = [(int(lo), int(hi)) for lo, hi in ranges]
            full = (int(full[0]), int(full[1]))
            visited = _blocks(ranges)
            assert len(visited) == len(set(visited)), (spec, i, ranges)
            assert sorted(visited) == list(np.flatnonzero(tile_any[i])), (spec, i, ranges)
            assert ranges[1][0] <= full[0] <= full[1] <= ranges[1][1]
            assert tile_all[i, full[0] : full[1]].all(), (spec, i, full)


def test_q_block_range_covers_exactly_the_blocks_that_see_a_key_block():
    for spec, sq, skv, kv_len, bq, bk in _specs():
        sq_pad = -(-sq // bq) * bq
        tile_any, tile_all = _tiles(_visible(spec, sq_pad, -(-skv // bk) * bk, kv_len), bq, bk)
        for j in range(-(-skv // bk)):
            kv0 = j * bk
            lo, hi = spec.q_block_range(kv0, kv0 + bk - 1, kv_len, sq_pad, bq)
            full = spec.full_q_block_range(kv0, kv0 + bk - 1, kv_len, bq, lo, hi)
            expected = list(np.flatnonzero(tile_any[:, j]))
            assert list(range(lo, hi)) == expected or (not expected and lo == hi), (spec, j)
            assert lo <= full[0] <= full[1] <= hi
            assert tile_all[full[0] : full[1], j].all(), (spec, j, full)


def test_nth_block_walks_ranges_then_repeats_the_last():
    ranges = ((0, 2), (5, 5), (7, 9))
    got = [tuple(int(x) for x in nth_block(ranges, jnp.int32(t))) for t in range(6)]
    assert got == [(0, 1), (1, 1), (7, 1), (8, 1), (8, 0), (8, 0)]
    assert [int(x) for x in nth_block(((3, 3),), jnp.int32(0))] == [0, 0]


def test_sinks_without_window_have_no_effect():
    spec = MaskSpec.for_attention(8, 8, causal=True, sliding_window=None, num_sink_tokens=3)
    plain = MaskSpec.for_attention(8, 8, causal=True, sliding_window=None, num_sink_tokens=0)
    assert spec == plain
    for q, k in itertools.product(range(8), range(8)):
        assert bool(spec.visible(q, k, 8)) == (k <= q)
