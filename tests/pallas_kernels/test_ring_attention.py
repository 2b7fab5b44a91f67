"""Context-parallel attention (``pallas_kernels.collectives``) on 8 fake CPU devices: ring and
all-gather strategies, both layouts, against ``attention_reference`` on the gathered sequence,
values and gradients. The mesh is ``data=2 x sequence=4`` so batch rows are split too."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels import attention_reference, platform
from pallas_kernels.collectives import (
    check_layout,
    context_attention,
    from_layout,
    shard_positions,
    to_layout,
)
from pallas_kernels.collectives.attention import block_kernel

SHARDS = 4
B, S, HQ, HKV, D = 2, 40, 4, 2, 8  # 40 = 5 chunks of 8 per zig-zag shard pair

CASES = {
    # name: (strategy, layout, options, segment ids); GQA (4 query heads on 2) throughout
    "ring-zigzag-causal-segments": ("ring", "zigzag", dict(causal=True), True),
    "ring-contiguous-window-sinks-cap": (
        "ring", "contiguous", dict(sliding_window=6, num_sink_tokens=2, logit_soft_cap=3.0),
        False,
    ),
    "ring-contiguous-noncausal-segments": ("ring", "contiguous", dict(causal=False), True),
    "allgather-zigzag-window-segments": ("all_gather", "zigzag", dict(sliding_window=9), True),
}  # fmt: skip


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh(
        (2, SHARDS), ("data", "sequence"), axis_types=(AxisType.Auto, AxisType.Auto)
    )


@pytest.fixture(scope="module")
def inputs():
    kq, kk, kv, kd = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(kq, (B, S, HQ, D), jnp.float32)
    k = jax.random.normal(kk, (B, S, HKV, D), jnp.float32)
    v = jax.random.normal(kv, (B, S, HKV, D), jnp.float32)
    weights = jax.random.normal(kd, (B, S, HQ, D), jnp.float32)
    # unequal documents; the boundaries fall inside chunks and differ per row
    seg = np.zeros((B, S), np.int32)
    seg[0, 13:], seg[0, 29:], seg[1, 5:] = 1, 2, 3
    return q, k, v, weights, jnp.asarray(seg)


def _sharded(mesh, strategy, layout, options, q, k, v, seg):
    """Global arrays in natural order -> lay out, split, attend per device, restore order."""
    spec = P("data", "sequence")
    laid = [to_layout(x, layout, SHARDS) for x in (q, k, v)]
    seg = None if seg is None else to_layout(seg, layout, SHARDS)
    fn = functools.partial(
        context_attention, axis_name="sequence", strategy=strategy, layout=layout, **options
    )
    mapped = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec, spec, spec, None if seg is None else spec),
        out_specs=spec,
        check_vma=False,
    )
    return from_layout(mapped(*laid, seg), layout, SHARDS)


def _reference(options, q, k, v, seg):
    return attention_reference(q, k, v, q_segment_ids=seg, **options)


def _values_and_grads(attend, q, k, v, weights):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(weights)


KERNEL_CASES = {
    # the flash kernels per block (interpret mode; no window: block_kernel), in float32 and
    # in bfloat16 (K/V travel and kernels run in it; partial results merge in float32)
    "ring-zigzag-causal-segments": ("ring", "zigzag", dict(causal=True), True),
    "allgather-contiguous-causal-cap-bf16": (
        "all_gather", "contiguous", dict(causal=True, logit_soft_cap=3.0), False,
    ),
}  # fmt: skip


def _assert_equal_to_reference(
    mesh, inputs, case, strategy, layout, options, with_segments, **block_impl
):
    q, k, v, weights, seg = inputs
    seg = seg if with_segments else None
    dtype = jnp.bfloat16 if case.endswith("bf16") else jnp.float32
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    attend = lambda *a: _sharded(mesh, strategy, layout, {**options, **block_impl}, *a, seg)  # noqa: E731
    ours = jax.jit(lambda *a: _values_and_grads(attend, *a, weights.astype(dtype)))(q, k, v)
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    want = _values_and_grads(lambda *a: _reference(options, *a, seg), *f32, weights)
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (want[0], *want[1]), strict=True
    ):
        assert a.dtype == dtype, name
        tol = 2e-5 if dtype == jnp.float32 else 2e-2 * float(jnp.abs(b).max())
        np.testing.assert_allclose(
            np.asarray(a, np.float32), b, atol=tol, rtol=tol, err_msg=f"{case}: {name}"
        )


@pytest.mark.parametrize("case", list(CASES))
def test_equals_full_attention_on_the_gathered_sequence(mesh, inputs, case):
    _assert_equal_to_reference(mesh, inputs, case, *CASES[case])


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_flash_kernels_per_block_equal_full_attention(mesh, inputs, case, backend, monkeypatch):
    monkeypatch.setattr(platform, "backend", lambda: backend)  # Triton or Mosaic kernels
    _assert_equal_to_reference(
        mesh, inputs, case, *KERNEL_CASES[case], block_impl="pallas", interpret=True
    )


def test_block_impl_is_checked():
    with pytest.raises(ValueError, match=r"block_impl must be one of \('auto', 'pallas', 'xla'\)"):
        block_kernel("triton", None)
    assert block_kernel("auto", None) is None  # XLA on CPU


def test_zigzag_layout_gives_every_shard_one_early_and_one_late_chunk():
    seq = np.arange(16)
    laid = np.asarray(to_layout(jnp.asarray(seq)[None], "zigzag", 4))[0]
    np.testing.assert_array_equal(laid.reshape(4, 4), [[0, 1, 14, 15], [2, 3, 12, 13],
                                                        [4, 5, 10, 11], [6, 7, 8, 9]])  # fmt: skip
    np.testing.assert_array_equal(from_layout(jnp.asarray(laid)[None], "zigzag", 4)[0], seq)
    np.testing.assert_array_equal(shard_positions("zigzag", 4, jnp.int32(1), 4), [2, 3, 12, 13])


def test_lengths_that_do_not_split_name_a_working_length():
    with pytest.raises(
        ValueError, match=r"multiple of 8 \(2 x sequence\); pad or cut it to 40 or 32"
    ):
        check_layout("zigzag", 36, 4)
    with pytest.raises(ValueError, match="multiple of 4; pad or cut it to 8 or 4"):
        check_layout("contiguous", 6, 4)


def test_a_local_length_the_zigzag_layout_cannot_halve_is_refused(mesh):
    x = jnp.zeros((2, 12, 2, 8))  # 3 rows per device: odd
    attend = jax.shard_map(
        functools.partial(context_attention, axis_name="sequence"),
        mesh=mesh, in_specs=P("data", "sequence"), out_specs=P("data", "sequence"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="sequence length 12 does not split over 4"):
        jax.eval_shape(lambda x: attend(x, x, x), x)
