"""Flash attention: the reference against independent oracles, then both Pallas
kernels (Triton and Mosaic, in interpret mode) against the reference, forward and
all three gradients."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import attention, attention_reference, platform
from pallas_kernels.attention import dispatch, flash_tpu
from pallas_kernels.attention.masks import MaskSpec

# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(b, sq, skv, hq, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (
        _normal(ks[0], (b, sq, hq, d), dtype),
        _normal(ks[1], (b, skv, hkv, d), dtype),
        _normal(ks[2], (b, skv, hkv, d), dtype),
        _normal(ks[3], (b, sq, hq, d), dtype),
    )


def _naive_attention(q, k, v, *, causal, q_seg, kv_seg, window, sinks, cap, scale):
    """Element-by-element float64 numpy attention, written from the spec."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for n in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                pos = i + (skv - sq if causal else 0)
                keys = [
                    j
                    for j in range(skv)
                    if (not causal or j <= pos)
                    and (window is None or pos - j < window or j < sinks)
                    and (q_seg is None or q_seg[n, i] == kv_seg[n, j])
                ]
                if not keys:
                    continue
                logits = np.array([q[n, i, h] @ k[n, j, kh] * scale for j in keys])
                if cap is not None:
                    logits = cap * np.tanh(logits / cap)
                p = np.exp(logits - logits.max())
                out[n, i, h] = (p / p.sum()) @ v[n, keys, kh]
    return out


def _out_and_grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of ``fn(q, k, v)`` for the cotangent ``do``."""
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(do))


def _vjp(fn, q, k, v, do):
    """:func:`_out_and_grads` in one jit (interpret mode is far slower eagerly)."""
    return jax.jit(lambda *args: _out_and_grads(fn, *args))(q, k, v, do)


def _assert_close(actual, expected, dtype, names=("out", "dq", "dk", "dv")):
    """Max error relative to the largest reference magnitude, per dtype."""
    tol = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}[dtype]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a.dtype == dtype, name
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.isfinite(a).all(), name
        err = np.abs(a - e).max() / max(np.abs(e).max(), 1e-6)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# ---------------------------------------------------------------------------
# The reference is the oracle: check it first against independent ones.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("causal", "window"), [(True, None), (False, None), (True, 5)], ids=["causal", "full", "window"]
)
def test_reference_matches_jax_nn(causal, window):
    q, k, v, _ = _qkv(2, 33, 33, 8, 2, 16, jnp.float32)
    ours = attention_reference(q, k, v, causal=causal, sliding_window=window)
    theirs = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="xla",
    )
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True, window=6, sinks=2),
        dict(causal=False, window=4, sinks=0),
        dict(causal=True, segments=True, cap=2.0),
        dict(causal=True, sq=7, scale=0.3),
        dict(causal=False, segments=True, sq=9),
    ],
    ids=["window-sinks", "window-noncausal", "segments-cap", "offset-scale", "cross-segments"],
)
def test_reference_matches_naive(kw):
    sq, skv = kw.get("sq", 20), 20
    q, k, v, _ = _qkv(2, sq, skv, 4, 2, 8, jnp.float32, seed=3)
    q_seg = kv_seg = None
    if kw.get("segments"):
        rng = np.random.default_rng(0)
        kv_seg = np.sort(rng.integers(0, 3, (2, skv)), axis=1).astype(np.int32)
        q_seg = kv_seg[:, skv - sq :] if sq != skv else kv_seg
    scale = kw.get("scale", 1 / math.sqrt(8))
    ours = attention_reference(
        q,
        k,
        v,
        causal=kw["causal"],
        q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
        kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg),
        sliding_window=kw.get("window"),
        num_sink_tokens=kw.get("sinks", 0),
        logit_soft_cap=kw.get("cap"),
        scale=kw.get("scale"),
    )
    naive = _naive_attention(
        q,
        k,
        v,
        causal=kw["causal"],
        q_seg=q_seg,
        kv_seg=kv_seg,
        window=kw.get("window"),
        sinks=kw.get("sinks", 0),
        cap=kw.get("cap"),
        scale=scale,
    )
    np.testing.assert_allclose(ours, naive, atol=2e-5)


# ---------------------------------------------------------------------------
# Kernels against the reference.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    sq: int
    skv: int
    hq: int
    hkv: int
    d: int
    dtype: type = jnp.float32
    causal: bool = True
    segments: bool = False
    window: int | None = None
    sinks: int = 0
    cap: float | None = None
    scale: float | None = None
    b: int = 1


CASES = {
    "causal-mha-d64-aligned": Case(128, 128, 2, 2, 64),
    "noncausal-gqa4-d64-ragged": Case(100, 100, 4, 1, 64, causal=False),
    "causal-gqa8-d128-ragged-bf16": Case(72, 72, 8, 1, 128, jnp.bfloat16),
    "segments-gqa4-ragged": Case(100, 100, 4, 1, 64, segments=True, b=2),
    "segments-noncausal-bf16": Case(96, 96, 2, 2, 64, jnp.bfloat16, causal=False, segments=True),
    "window-sinks-d128-bf16": Case(150, 150, 4, 2, 128, jnp.bfloat16, window=40, sinks=4),
    "window-sinks-segments": Case(130, 130, 2, 1, 64, window=33, sinks=3, segments=True),
    "softcap-window-scale": Case(100, 100, 2, 1, 64, window=50, cap=5.0, scale=0.2),
    "causal-sq-lt-skv": Case(40, 100, 4, 1, 64),
    "noncausal-sq-gt-skv-head-dim-40": Case(90, 50, 2, 1, 40, causal=False),
}


def _segment_ids(case: Case):
    if not case.segments:
        return None, None
    # Packed documents of different lengths; the two batch rows differ.
    bounds = jnp.array([[0, 30, 61, 90], [0, 47, 52, 80]])[: case.b]
    ids = jnp.sum(jnp.arange(case.sq)[None, :, None] >= bounds[:, None, :], axis=-1)
    return ids.astype(jnp.int32), ids.astype(jnp.int32)


def _gpu_kernel(case: Case, block: int = 32):
    q_seg, kv_seg = _segment_ids(case)
    return lambda q, k, v: attention(
        q,
        k,
        v,
        causal=case.causal,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        sliding_window=case.window,
        num_sink_tokens=case.sinks,
        logit_soft_cap=case.cap,
        scale=case.scale,
        implementation="pallas",
        block_q=block,
        block_kv=block,
    )


def _tpu_kernel(case: Case, block: int = 128):
    q_seg, kv_seg = _segment_ids(case)
    mask = MaskSpec.for_attention(
        case.sq,
        case.skv,
        causal=case.causal,
        sliding_window=case.window,
        num_sink_tokens=case.sinks,
    )
    scale = 1 / math.sqrt(case.d) if case.scale is None else case.scale
    return lambda q, k, v: flash_tpu.flash_attention(
        q,
        k,
        v,
        q_seg,
        kv_seg,
        mask=mask,
        scale=scale,
        logit_soft_cap=case.cap,
        block_q=block,
        block_kv=block,
        interpret=True,
    )


def _reference(case: Case):
    q_seg, kv_seg = _segment_ids(case)
    return lambda q, k, v: attention_reference(
        q,
        k,
        v,
        causal=case.causal,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        sliding_window=case.window,
        num_sink_tokens=case.sinks,
        logit_soft_cap=case.cap,
        scale=case.scale,
    )


def _check_case(case: Case, kernel):
    q, k, v, do = _qkv(case.b, case.sq, case.skv, case.hq, case.hkv, case.d, case.dtype)
    f32 = lambda x: x.astype(jnp.float32)
    expected = _vjp(_reference(case), f32(q), f32(k), f32(v), f32(do))
    _assert_close(_vjp(kernel, q, k, v, do), expected, case.dtype)


@pytest.mark.parametrize("name", CASES)
def test_triton_kernel_matches_reference(name):
    case = CASES[name]
    _check_case(case, _gpu_kernel(case))


@pytest.mark.parametrize("name", CASES)
def test_mosaic_kernel_matches_reference(name):
    case = CASES[name]
    _check_case(case, _tpu_kernel(case))


def test_unequal_forward_and_backward_tiles():
    """Table tiles differ per kernel (f32, head_dim 64: fwd 64x64, dK/dV 32x64, dQ 64x32)."""
    case = Case(200, 200, 4, 2, 64, window=70, sinks=2)
    kernel = lambda q, k, v: attention(
        q, k, v, sliding_window=70, num_sink_tokens=2, implementation="pallas"
    )
    _check_case(case, kernel)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_fully_masked_rows_are_zero_with_finite_gradients(backend):
    # Query segment 7 appears in no key: those rows see nothing.
    q, k, v, do = _qkv(1, 64, 64, 2, 1, 64, jnp.float32)
    q_seg = jnp.where(jnp.arange(64) < 40, 0, 7)[None].astype(jnp.int32)
    kv_seg = jnp.zeros((1, 64), jnp.int32)
    kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    if backend == "triton":
        kernel = lambda q, k, v: attention(q, k, v, implementation="pallas", block_q=32, **kw)
    else:
        mask = MaskSpec.for_attention(64, 64, causal=True, sliding_window=None, num_sink_tokens=0)
        kernel = lambda q, k, v: flash_tpu.flash_attention(
            q, k, v, q_seg, kv_seg, mask=mask, scale=0.125, logit_soft_cap=None, interpret=True
        )
    got = _vjp(kernel, q, k, v, do)
    expected = _vjp(lambda q, k, v: attention_reference(q, k, v, **kw), q, k, v, do)
    assert np.all(np.asarray(got[0])[:, 40:] == 0.0)
    assert np.all(np.asarray(got[1])[:, 40:] == 0.0)
    _assert_close(got, expected, jnp.float32)


# ---------------------------------------------------------------------------
# Dispatch, validation, XLA path under jit / grad / sharding.
# ---------------------------------------------------------------------------


def test_auto_on_cpu_is_the_xla_reference():
    q, k, v, _ = _qkv(1, 16, 16, 4, 2, 8, jnp.float32)
    out = attention(q, k, v)
    np.testing.assert_array_equal(out, attention(q, k, v, implementation="xla"))
    np.testing.assert_allclose(out, attention_reference(q, k, v), rtol=1e-6, atol=1e-6)


def test_jit_grad_with_batch_sharded_inputs():
    """XLA keeps the batch sharding; the Pallas kernel (interpret) gives the same gradients."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, _ = _qkv(8, 40, 40, 4, 2, 16, jnp.float32)
    seg = jnp.broadcast_to(jnp.arange(40) // 13, (8, 40)).astype(jnp.int32)
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, seg)]

    def loss(implementation):
        def fn(q, k, v, seg):
            out = attention(
                q, k, v, q_segment_ids=seg, sliding_window=9, implementation=implementation
            )
            return jnp.sum(out**2)

        return jax.jit(jax.grad(fn, argnums=(0, 1, 2)))

    grads = loss("xla")(*sharded)
    for g, e in zip(grads, loss("xla")(q, k, v, seg), strict=True):
        assert g.sharding.spec == P("data")
        np.testing.assert_allclose(g, e, atol=1e-5)
    for g, e in zip(loss("pallas")(*sharded), grads, strict=True):
        np.testing.assert_allclose(g, e, atol=2e-5)


def _bad(**overrides):
    q, k, v, _ = _qkv(1, 8, 8, 4, 2, 8, jnp.float32)
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (dict(q=jnp.zeros((8, 4, 8))), ValueError, "rank 4"),
        (dict(k=jnp.zeros((1, 8, 3, 8)), v=jnp.zeros((1, 8, 3, 8))), ValueError, "multiple of"),
        (dict(implementation="fast"), ValueError, "implementation must be one of"),
        (dict(implementation="cudnn"), ValueError, "cudnn.*GPU backend"),
        (dict(sliding_window=0), ValueError, "sliding_window"),
        (dict(num_sink_tokens=-1), ValueError, "num_sink_tokens"),
        (dict(logit_soft_cap=-1.0), ValueError, "logit_soft_cap"),
        (dict(q_segment_ids=jnp.zeros((1, 7), jnp.int32)), ValueError, r"\(1, 8\)"),
        (dict(kv_segment_ids=jnp.zeros((1, 8), jnp.int32)), ValueError, "without q_segment_ids"),
        (dict(q_segment_ids=jnp.zeros((1, 8))), TypeError, "integer"),
    ],
)
def test_bad_input_raises_clear_error(overrides, error, message):
    args = _bad(**overrides)
    with pytest.raises(error, match=message):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_dtype_mismatch_is_a_type_error():
    q, k, v, _ = _qkv(1, 8, 8, 4, 2, 8, jnp.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))


@pytest.mark.parametrize("block", [24, 8])
def test_bad_triton_block_raises(block):
    q, k, v, _ = _qkv(1, 8, 8, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        attention(q, k, v, implementation="pallas", block_q=block)


def test_cudnn_never_gets_a_window_without_causal(monkeypatch):
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    q, k, _, _ = _qkv(1, 8, 8, 4, 2, 64, jnp.bfloat16)
    base = dict(q_segment_ids=None, sliding_window=None, num_sink_tokens=0, logit_soft_cap=None)
    reason = dispatch.cudnn_unsupported_reason
    assert reason(q, k, causal=True, **base) is None
    assert reason(q, k, causal=True, **{**base, "sliding_window": 4}) is None
    assert "causal=True" in reason(q, k, causal=False, **{**base, "sliding_window": 4})
    assert "sink" in reason(
        q, k, causal=True, **{**base, "sliding_window": 4, "num_sink_tokens": 2}
    )
    assert "segment" in reason(q, k, causal=True, **{**base, "q_segment_ids": jnp.zeros((1, 8))})
    assert "soft-capping" in reason(q, k, causal=True, **{**base, "logit_soft_cap": 5.0})
    assert "bfloat16" in reason(q.astype(jnp.float32), k, causal=True, **base)
    assert "aligns the ends" in reason(q, k[:, :4], causal=True, **base)


# ---------------------------------------------------------------------------
# GPU "auto": cuDNN without segment ids when every row is one segment, else Pallas.
# ---------------------------------------------------------------------------


def _ids(rows):
    return jnp.asarray(rows, jnp.int32)


@pytest.mark.parametrize(
    ("q_seg", "kv_seg", "single"),
    [
        ([[1, 1, 1], [2, 2, 2]], None, True),
        ([[0, 0, 0], [5, 5, 5]], None, True),  # an all-padding row is one segment
        ([[1, 1, 2], [3, 3, 3]], None, False),
        ([[1, 1, 0], [1, 1, 1]], None, False),  # document + padding (pad id 0): two segments
        ([[1, 1, 1]], [[2, 2, 2]], False),  # queries see no key at all
        ([[4, 4]], [[4, 4, 4, 4]], True),
    ],
)
def test_single_segment_rows(q_seg, kv_seg, single):
    q_seg = _ids(q_seg)
    kv_seg = q_seg if kv_seg is None else _ids(kv_seg)
    assert bool(dispatch.single_segment_rows(q_seg, kv_seg)) is single


def test_by_segment_count_runs_one_branch_and_differentiates_through_it():
    q = jnp.arange(6.0).reshape(1, 3, 1, 2)
    grad = jax.jit(
        jax.grad(
            lambda q, seg: jnp.sum(
                dispatch.by_segment_count(
                    q, q, q, seg, seg,
                    single=lambda q, k, v: 2.0 * q,
                    several=lambda q, k, v, q_seg, kv_seg: 3.0 * q,
                )
            )
        )
    )  # fmt: skip
    np.testing.assert_array_equal(grad(q, _ids([[7, 7, 7]])), 2.0)
    np.testing.assert_array_equal(grad(q, _ids([[7, 7, 8]])), 3.0)


def test_auto_route(monkeypatch):
    q, k, _, _ = _qkv(1, 8, 8, 4, 2, 64, jnp.bfloat16)
    seg = jnp.zeros((1, 8), jnp.int32)
    base = dict(causal=True, q_segment_ids=None, sliding_window=None, num_sink_tokens=0,
                logit_soft_cap=None)  # fmt: skip
    route = lambda q=q, k=k, **kw: dispatch.auto_route(q, k, **{**base, **kw})
    for backend, expected in (("cpu", "xla"), ("tpu", "pallas")):
        monkeypatch.setattr(platform, "backend", lambda b=backend: b)
        assert route(q_segment_ids=seg) == expected
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    assert route() == "cudnn"
    assert route(q_segment_ids=seg) == dispatch.CUDNN_OR_PALLAS
    assert route(q_segment_ids=seg, sliding_window=4) == dispatch.CUDNN_OR_PALLAS
    # Whatever else cuDNN cannot express keeps the kernel for every batch.
    assert route(q_segment_ids=seg, logit_soft_cap=5.0) == "pallas"
    assert route(q_segment_ids=seg, sliding_window=4, num_sink_tokens=2) == "pallas"
    assert route(q=q.astype(jnp.float32), q_segment_ids=seg) == "pallas"
    assert route(k=k[:, :4], q_segment_ids=seg) == "pallas"


def test_auto_on_gpu_picks_cudnn_per_batch_in_one_compiled_program(monkeypatch):
    """A stand-in GPU: cuDNN replaced by the reference without segment ids, the Triton
    kernel in interpret mode; each records (on device, at run time) that it ran."""
    ran = []

    def fake_cudnn(q, k, v, *, causal, sliding_window, scale):
        jax.debug.callback(lambda: ran.append("cudnn"))
        return attention_reference(q, k, v, causal=causal, sliding_window=sliding_window,
                                   scale=scale)  # fmt: skip

    pallas = dispatch._pallas_attention

    def recording_pallas(*args, **kwargs):
        jax.debug.callback(lambda: ran.append("pallas"))
        return pallas(*args, **kwargs)

    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_cudnn_attention", fake_cudnn)
    monkeypatch.setattr(dispatch, "_pallas_attention", recording_pallas)
    traces = []

    @jax.jit
    def run(q, k, v, do, seg):
        traces.append(1)
        fn = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, sliding_window=40,
                                       interpret=True)  # fmt: skip
        return _out_and_grads(fn, q, k, v, do)

    @jax.jit
    def reference(q, k, v, do, seg):
        fn = lambda q, k, v: attention_reference(q, k, v, q_segment_ids=seg, sliding_window=40)
        return _out_and_grads(fn, q, k, v, do)

    q, k, v, do = _qkv(2, 64, 64, 2, 1, 64, jnp.bfloat16)
    pos = jnp.arange(64)
    batches = [
        ("cudnn", [jnp.full(64, 1), jnp.full(64, 2)]),  # one document per row
        ("pallas", [1 + (pos >= 20), jnp.full(64, 3)]),  # a row packs two documents
        ("pallas", [jnp.where(pos < 50, 1, 0), jnp.full(64, 1)]),  # document + padding (id 0)
    ]
    f32 = lambda x: x.astype(jnp.float32)
    for branch, rows in batches:
        seg = jnp.stack(rows).astype(jnp.int32)
        ran.clear()
        got = run(q, k, v, do, seg)
        jax.effects_barrier()
        assert ran == [branch]
        _assert_close(got, reference(f32(q), f32(k), f32(v), f32(do), seg), jnp.bfloat16)
    assert len(traces) == 1
