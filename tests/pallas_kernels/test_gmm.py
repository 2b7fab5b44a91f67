"""Grouped matmuls: the ``ragged_dot`` reference against a dense one-hot oracle, then the
Triton kernels and megablox (Pallas interpret mode) against the reference, values and
gradients of ``gmm`` and ``tgmm``; routing, validation, and what the backward keeps alive.

Kernels run through the public ops (so through the shared ``custom_vjp``), with dispatch
told it runs on a GPU or TPU host. Oracles are computed in float32 from the very inputs
(bfloat16 inputs upcast exactly), so kernel errors are measured, not reference ones.
"""

import functools
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm, gmm_reference, platform, tgmm, tgmm_reference
from pallas_kernels.moe import dispatch, gpu, tpu

M, K, N = 200, 136, 72  # no dimension a multiple of any tile
GROUPS = {  # 4 groups each; boundaries fall inside row tiles of 16, 64 and 128
    "empty-groups": [0, 130, 0, 70],
    "one-group": [0, 0, 200, 0],
    "uneven": [7, 121, 1, 71],
    "rows-past-total": [5, 0, 117, 9],  # 131 of 200 rows in a group
    "all-empty": [0, 0, 0, 0],
}
# (lhs/grad dtype, weight dtype): the last is float32 master weights under bfloat16 compute.
DTYPES = {
    "f32": (jnp.float32, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.bfloat16),
    "bf16-f32-weights": (jnp.bfloat16, jnp.float32),
}
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1e-2}
ROUTES = {  # name -> (backend dispatch is told, tiling)
    "triton-table": ("gpu", None),
    "triton-16": ("gpu", (16, 16, 16)),
    "megablox-128": ("tpu", (128, 128, 128)),  # ragged k and n tiles; m padded to 256
}
NAMES = ("gmm", "gmm d_lhs", "gmm d_rhs", "tgmm", "tgmm d_lhs", "tgmm d_grad")


def _normal(seed: int, shape, dtype) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _inputs(dtypes: str, num_groups: int = 4):
    """lhs [M, K], rhs [g, K, N], grad [M, N], and cotangents for gmm / tgmm."""
    dtype, w_dtype = DTYPES[dtypes]
    return (
        _normal(0, (M, K), dtype),
        _normal(1, (num_groups, K, N), w_dtype),
        _normal(2, (M, N), dtype),
        _normal(3, (num_groups, K, N), jnp.float32 if w_dtype != dtype else dtype),
    )


def _one_hot_groups(group_sizes, m: int) -> jax.Array:
    """``[m, g]`` float32: row ``r`` is 1 at its group, all 0 past ``sum(group_sizes)``."""
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(m), side="right")
    return jax.nn.one_hot(group, group_sizes.shape[0], dtype=jnp.float32)


def _dense_gmm(lhs, rhs, group_sizes):
    """``sum_g onehot[m, g] lhs[m] @ rhs[g]``: the definition, differentiable by plain AD."""
    hot = _one_hot_groups(group_sizes, lhs.shape[0])
    return jnp.einsum("mg,mk,gkn->mn", hot, lhs, rhs, precision="highest")


def _dense_tgmm(lhs, grad, group_sizes):
    hot = _one_hot_groups(group_sizes, lhs.shape[0])
    return jnp.einsum("mg,mk,mn->gkn", hot, lhs, grad, precision="highest")


def _values_and_grads(gmm_fn, tgmm_fn, lhs, rhs, grad, d_out, d_w, group_sizes):
    """``gmm`` / ``tgmm`` values and their gradients for the cotangents ``d_out`` / ``d_w``:
    (gmm, d_lhs, d_rhs, tgmm, d_lhs, d_grad)."""
    out, pull = jax.vjp(lambda a, b: gmm_fn(a, b, group_sizes), lhs, rhs)
    w, tpull = jax.vjp(lambda a, b: tgmm_fn(a, b, group_sizes), lhs, grad)
    return (out, *pull(d_out), w, *tpull(d_w))


@functools.partial(jax.jit, static_argnames=("backend", "tiling", "interpret"))
def _kernel_run(lhs, rhs, grad, d_w, group_sizes, *, backend: str, tiling, interpret=True):
    """Values and gradients through the public ops, dispatch told it runs on ``backend``
    (static, so every backend traces and caches separately); cotangent of gmm = grad."""
    kw = dict(implementation="pallas", interpret=interpret, tiling=tiling)
    with mock.patch.object(platform, "backend", lambda: backend):
        return _values_and_grads(
            functools.partial(gmm, **kw),
            functools.partial(tgmm, preferred_element_type=d_w.dtype, **kw),
            lhs, rhs, grad, grad, d_w, group_sizes,
        )  # fmt: skip


@jax.jit
def _reference_run(lhs, rhs, grad, d_w, group_sizes):
    """The same through the ``ragged_dot`` references, in float32."""
    f32 = lambda x: x.astype(jnp.float32)
    return _values_and_grads(
        gmm_reference, tgmm_reference, f32(lhs), f32(rhs), f32(grad), f32(grad), f32(d_w),
        group_sizes,
    )  # fmt: skip


def _assert_close(actual, expected, dtypes, names=NAMES):
    """Max error relative to the largest reference magnitude (at least 1), per compute
    dtype; each result in its expected dtype."""
    dtype, w_dtype = (jnp.dtype(d) for d in DTYPES[dtypes])
    out_dtypes = (dtype, dtype, w_dtype, w_dtype, dtype, dtype)
    for name, a, e, want in zip(names, actual, expected, out_dtypes, strict=True):
        assert a.dtype == want, f"{name}: dtype {a.dtype}, want {want}"
        assert a.shape == e.shape, name
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.isfinite(a).all(), name
        tol = TOL[dtype]  # the compute dtype bounds every result
        err = np.abs(a - e).max() / max(np.abs(e).max(), 1.0)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# ---------------------------------------------------------------------------
# The reference is the oracle: check it first against the dense definition.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("groups", GROUPS)
def test_reference_values_and_grads_match_dense_oracle(groups):
    lhs, rhs, grad, d_w = _inputs("f32")
    group_sizes = jnp.array(GROUPS[groups], jnp.int32)
    ours = _reference_run(lhs, rhs, grad, d_w, group_sizes)
    dense = jax.jit(_values_and_grads, static_argnums=(0, 1))(
        _dense_gmm, _dense_tgmm, lhs, rhs, grad, grad, d_w, group_sizes
    )
    _assert_close(ours, dense, "f32")
    total = sum(GROUPS[groups])
    assert not np.asarray(ours[0][total:]).any(), "rows past sum(group_sizes) must be zero"
    empty = np.asarray(GROUPS[groups]) == 0
    assert not np.asarray(ours[3][empty]).any(), "empty groups must give zero tgmm blocks"


# ---------------------------------------------------------------------------
# The kernels against the reference.
# ---------------------------------------------------------------------------


# Every route in float32 and bfloat16; float32 weights under bfloat16 compute once per
# kernel family (megablox: in the TPU-interpreter test below).
KERNEL_CASES = [
    (route, dtypes)
    for route in ROUTES
    for dtypes in DTYPES
    if dtypes != "bf16-f32-weights" or route == "triton-table"
]


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize(("route", "dtypes"), KERNEL_CASES)
def test_kernels_match_reference(route, dtypes, groups):
    backend, tiling = ROUTES[route]
    lhs, rhs, grad, d_w = _inputs(dtypes)
    group_sizes = jnp.array(GROUPS[groups], jnp.int32)
    ours = _kernel_run(lhs, rhs, grad, d_w, group_sizes, backend=backend, tiling=tiling)
    _assert_close(ours, _reference_run(lhs, rhs, grad, d_w, group_sizes), dtypes)
    assert not np.asarray(ours[0][sum(GROUPS[groups]) :], np.float32).any()


def test_megablox_in_tpu_interpret_mode(run_checked_script):
    """megablox under the TPU-faithful interpreter (``pltpu.InterpretParams``: kernel
    buffers start as NaN, out-of-bounds reads raise). In a single-device subprocess with
    a timeout: that interpreter can hang with several fake devices once kernel buffers
    reach ~128 KiB (these reach 157 KiB)."""
    run_checked_script(Path(__file__).with_name("gmm_tpu_interpret.py"), devices=1, timeout=240)


def test_auto_on_cpu_is_xla_and_matches_reference():
    """The fallback runs through the same custom_vjp as the kernels."""
    lhs, rhs, grad, d_w = _inputs("bf16-f32-weights")
    group_sizes = jnp.array(GROUPS["uneven"], jnp.int32)
    assert dispatch.auto_route(lhs.dtype, M, K, N, 4) == "xla"
    ours = jax.jit(_values_and_grads, static_argnums=(0, 1))(
        gmm, functools.partial(tgmm, preferred_element_type=jnp.float32),
        lhs, rhs, grad, grad, d_w, group_sizes,
    )  # fmt: skip
    _assert_close(ours, _reference_run(lhs, rhs, grad, d_w, group_sizes), "bf16-f32-weights")


@pytest.mark.parametrize("sizes", [[150], [60, 0, 100]], ids=["1-group", "3-groups"])
def test_triton_group_counts_that_are_not_powers_of_two(sizes):
    """The Triton kernels pad the group bounds to a power of two; padding owns no row."""
    lhs, rhs, grad, d_w = _inputs("f32", num_groups=len(sizes))
    group_sizes = jnp.array(sizes, jnp.int32)
    ours = _kernel_run(lhs, rhs, grad, d_w, group_sizes, backend="gpu", tiling=(16, 16, 16))
    _assert_close(ours, _reference_run(lhs, rhs, grad, d_w, group_sizes), "f32")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_group_sizes_past_m_are_clamped_like_the_reference(backend):
    lhs, rhs, grad, d_w = _inputs("f32")
    group_sizes = jnp.array([150, 0, 100, 7], jnp.int32)  # sums to 257 > M
    ours = _kernel_run(lhs, rhs, grad, d_w, group_sizes, backend=backend, tiling=None)
    _assert_close(ours, _reference_run(lhs, rhs, grad, d_w, group_sizes), "f32")


# ---------------------------------------------------------------------------
# Routing and validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "dtype", "shape", "route"),
    [
        ("cpu", jnp.float32, (8, 8, 8, 2), "xla"),
        ("gpu", jnp.bfloat16, (8, 8, 8, 2), "triton"),
        ("gpu", jnp.float16, (8, 8, 8, 2), "triton"),
        ("tpu", jnp.bfloat16, (8, 8, 8, 2), "megablox"),
        ("tpu", jnp.float16, (8, 8, 8, 2), "xla"),  # megablox rejects float16
        ("gpu", jnp.float32, (0, 8, 8, 2), "xla"),  # no rows
        ("tpu", jnp.float32, (8, 8, 8, 0), "xla"),  # no groups
    ],
)
def test_auto_route(monkeypatch, backend, dtype, shape, route):
    monkeypatch.setattr(platform, "backend", lambda: backend)
    assert dispatch.auto_route(jnp.dtype(dtype), *shape) == route
    reason = dispatch.pallas_unsupported_reason(jnp.dtype(dtype), *shape)
    assert (reason is None) == (route != "xla" or backend == "cpu")


def test_pallas_raises_with_the_reason_where_auto_falls_back(monkeypatch):
    monkeypatch.setattr(platform, "backend", lambda: "tpu")
    lhs, rhs = jnp.ones((8, 8), jnp.float16), jnp.ones((2, 8, 8), jnp.float16)
    sizes = jnp.array([3, 5], jnp.int32)
    with pytest.raises(ValueError, match="megablox takes bfloat16/float32"):
        gmm(lhs, rhs, sizes, implementation="pallas")
    out = gmm(lhs, rhs, sizes)  # auto: ragged_dot
    np.testing.assert_array_equal(out, gmm_reference(lhs, rhs, sizes))


_L, _W, _S = jnp.ones((8, 4)), jnp.ones((2, 4, 6)), jnp.array([3, 5], jnp.int32)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: gmm(_L[None], _W, _S), ValueError, r"lhs must have rank 2 \[m, k\]"),
        (lambda: gmm(_L, _W[0], _S), ValueError, r"rhs must have rank 3"),
        (lambda: gmm(_L, _W, _S[None]), ValueError, "group_sizes must have rank 1"),
        (lambda: gmm(_L, _W, _S[:1]), ValueError, "group_sizes has 1 groups but rhs has 2"),
        (lambda: gmm(_L[:, :3], _W, _S), ValueError, "must agree on k"),
        (lambda: gmm(_L.astype(int), _W, _S), TypeError, "lhs must be a floating-point"),
        (lambda: gmm(_L, _W, _S.astype(float)), TypeError, "group_sizes must be an integer"),
        (lambda: gmm(_L, _W, _S, implementation="cudnn"), ValueError, "implementation must"),
        (lambda: gmm(_L, _W, _S, tiling=(16, 16)), ValueError, "tiling must be a tuple of 3"),
        (lambda: gmm(_L, _W, _S, implementation="pallas", tiling=(16, 24, 16)), ValueError,
         "block_k must be a power of two"),
        (lambda: tgmm(_L, _L[:4], _S), ValueError, "must have the same rows"),
        (lambda: tgmm(_L, _L.astype(jnp.bfloat16), _S), TypeError, "share one dtype"),
        (lambda: tgmm(_L, _L, _S, preferred_element_type=jnp.int32), TypeError,
         "preferred_element_type must be a float"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_with_the_fix(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_tpu_tiling_raises(monkeypatch):
    monkeypatch.setattr(platform, "backend", lambda: "tpu")
    with pytest.raises(ValueError, match="multiples of 128"):
        gmm(jnp.ones((8, 200)), jnp.ones((2, 200, 8)), _S, tiling=(128, 100, 128))


# ---------------------------------------------------------------------------
# Tiles.
# ---------------------------------------------------------------------------

A100_SMEM = 163 * 1024  # largest opt-in shared memory of one block on A100 (H100: 227 KiB)


@pytest.mark.parametrize("itemsize", sorted(gpu.TILE_TABLE))
def test_triton_tiles_fit_shared_memory_with_float32_weights(itemsize):
    """``num_stages`` buffers of both loaded tiles; gmm weight tiles are loaded at the
    weights' own width (float32 master weights), before the cast."""
    t_gmm, t_tgmm = gpu.TILE_TABLE[itemsize]
    gmm_bytes = t_gmm.num_stages * (
        t_gmm.block_m * t_gmm.block_k * itemsize + t_gmm.block_k * t_gmm.block_n * 4
    )
    tgmm_bytes = t_tgmm.num_stages * itemsize * t_tgmm.block_m * (t_tgmm.block_k + t_tgmm.block_n)
    assert gmm_bytes <= A100_SMEM and tgmm_bytes <= A100_SMEM


def test_tiles_shrink_to_small_shapes_and_overrides_win():
    t_gmm, t_tgmm = gpu.tiles_for(jnp.bfloat16, 20, 3, 300)
    assert (t_gmm.block_m, t_gmm.block_k, t_gmm.block_n) == (32, 16, 128)
    assert (t_tgmm.block_m, t_tgmm.block_k, t_tgmm.block_n) == (32, 16, 128)
    t_gmm, _ = gpu.tiles_for(jnp.float32, 4096, 4096, 4096, (32, 64, 128))
    assert (t_gmm.block_m, t_gmm.block_k, t_gmm.block_n) == (32, 64, 128)
    assert tpu.tiling_for(200, 136, 72) == (256, 136, 72)
    assert tpu.tiling_for(640, 4096, 1000) == (128, 512, 512)
    assert tpu.tiling_for(4096, 768, 1536) == (512, 256, 512)


# ---------------------------------------------------------------------------
# Memory: the backward keeps the weights the caller passed, never a per-layer copy.
# ---------------------------------------------------------------------------


def _forward_scan_outputs(layer, num_layers=3, g=4, k=24, n=40) -> list[tuple]:
    """``(shape, dtype)`` of every output of the forward scan in ``grad`` of a scan over
    ``num_layers`` MoE layers (``layer(x, w_up, w_down)``), float32 weights stacked
    ``[layers, g, k, n]`` / ``[layers, g, n, k]``, bfloat16 activations."""
    w_up = jnp.ones((num_layers, g, k, n), jnp.float32)
    w_down = jnp.ones((num_layers, g, n, k), jnp.float32)
    x = jnp.ones((32, k), jnp.bfloat16)
    sizes = jnp.array([10, 0, 15, 7], jnp.int32)

    def loss(ws, x):
        def body(x, w):
            return layer(x, *w, sizes), None

        return jax.lax.scan(body, x, ws)[0].astype(jnp.float32).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))((w_up, w_down), x).jaxpr
    forward = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    return [(v.aval.shape, v.aval.dtype) for v in forward.outvars]


def _stacked_weight_copies(outputs, num_layers=3, g=4, k=24, n=40) -> list[tuple]:
    return [o for o in outputs if o[0] in ((num_layers, g, k, n), (num_layers, g, n, k))]


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_scanned_backward_keeps_no_per_layer_weight_copy(implementation):
    def layer(x, w_up, w_down, sizes):
        h = jax.nn.gelu(gmm(x, w_up, sizes, implementation=implementation))
        return gmm(h, w_down, sizes, implementation=implementation)

    outputs = _forward_scan_outputs(layer)
    assert _stacked_weight_copies(outputs) == [], outputs


def test_scanned_backward_check_catches_a_cast_outside_gmm():
    """The control: casting the weights before the op makes the cast the residual, and
    scan stacks one bfloat16 copy per layer. The check above would see it."""

    def layer(x, w_up, w_down, sizes):
        h = jax.nn.gelu(gmm(x, w_up.astype(x.dtype), sizes))
        return gmm(h, w_down.astype(x.dtype), sizes)

    copies = _stacked_weight_copies(_forward_scan_outputs(layer))
    assert {dtype for _, dtype in copies} == {jnp.dtype(jnp.bfloat16)} and len(copies) == 2
