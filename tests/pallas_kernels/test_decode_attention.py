"""Decode attention: the reference against full attention, then the Triton and
Mosaic split-KV kernels (interpret mode) against the reference on ragged lengths."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    attention_reference,
    decode_attention,
    decode_attention_reference,
)
from pallas_kernels.attention import decode_tpu
from pallas_kernels.attention.masks import MaskSpec


def _inputs(b, s, hq, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    return normal(ks[0], (b, hq, d)), normal(ks[1], (b, s, hkv, d)), normal(ks[2], (b, s, hkv, d))


@pytest.mark.parametrize(("window", "sinks"), [(None, 0), (5, 2)])
def test_reference_is_the_last_row_of_causal_attention(window, sinks):
    q, k, v = _inputs(3, 24, 4, 2, 8, jnp.float32)
    lengths = [1, 17, 24]
    got = decode_attention_reference(
        q, k, v, jnp.array(lengths), sliding_window=window, num_sink_tokens=sinks
    )
    for i, n in enumerate(lengths):
        full = attention_reference(
            q[i : i + 1, None],
            k[i : i + 1, :n],
            v[i : i + 1, :n],
            causal=True,
            sliding_window=window,
            num_sink_tokens=sinks,
        )
        np.testing.assert_allclose(got[i], full[0, 0], atol=1e-6)


@dataclasses.dataclass(frozen=True)
class Case:
    s: int
    hq: int
    hkv: int
    d: int
    lengths: tuple[int, ...]
    dtype: type = jnp.float32
    window: int | None = None
    sinks: int = 0
    cap: float | None = None
    block: int = 32


CASES = {
    "mha-d64": Case(256, 2, 2, 64, (0, 1, 100, 256)),
    "gqa4-d128-bf16": Case(192, 8, 2, 128, (5, 192, 64), jnp.bfloat16),
    "gqa8-d64-cache-not-block-multiple": Case(200, 8, 1, 64, (200, 33, 199)),
    "window-sinks-gqa4": Case(256, 4, 1, 64, (256, 40, 3), window=48, sinks=4),
    "window-softcap-bf16": Case(160, 4, 1, 128, (160, 90), jnp.bfloat16, window=70, cap=4.0),
    "head-dim-40": Case(96, 4, 2, 40, (96, 7), block=16),
}


def _assert_close(got, expected, dtype):
    assert got.dtype == dtype
    tol = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}[dtype]
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    err = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-6)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _run(case: Case, kernel):
    b = len(case.lengths)
    q, k, v = _inputs(b, case.s, case.hq, case.hkv, case.d, case.dtype)
    lengths = jnp.array(case.lengths, jnp.int32)
    f32 = lambda x: x.astype(jnp.float32)
    expected = decode_attention_reference(
        f32(q),
        f32(k),
        f32(v),
        lengths,
        sliding_window=case.window,
        num_sink_tokens=case.sinks,
        logit_soft_cap=case.cap,
    )
    got = jax.jit(kernel)(q, k, v, lengths)
    _assert_close(got, expected, case.dtype)
    zero_rows = [i for i, n in enumerate(case.lengths) if n == 0]
    assert np.all(np.asarray(got, np.float32)[zero_rows] == 0.0)


@pytest.mark.parametrize("name", CASES)
def test_triton_decode_matches_reference(name):
    case = CASES[name]
    kernel = lambda q, k, v, lengths: decode_attention(
        q,
        k,
        v,
        lengths,
        sliding_window=case.window,
        num_sink_tokens=case.sinks,
        logit_soft_cap=case.cap,
        implementation="pallas",
        block_kv=case.block,
    )
    _run(case, kernel)


@pytest.mark.parametrize("name", CASES)
def test_mosaic_decode_matches_reference(name):
    case = CASES[name]
    mask = MaskSpec(causal=True, sliding_window=case.window, num_sink_tokens=case.sinks)
    kernel = lambda q, k, v, lengths: decode_tpu.decode_attention(
        q,
        k,
        v,
        lengths,
        mask=mask,
        scale=1 / math.sqrt(case.d),
        logit_soft_cap=case.cap,
        block_kv=case.block,
        num_splits=3,
        interpret=True,
    )
    _run(case, kernel)


def test_default_tiles_and_splits():
    case = Case(384, 4, 2, 64, (384, 129, 0), window=100, sinks=1)
    kernel = lambda q, k, v, lengths: decode_attention(
        q, k, v, lengths, sliding_window=100, num_sink_tokens=1, implementation="pallas"
    )
    _run(case, kernel)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(q=jnp.zeros((2, 1, 4, 8))), ValueError, "rank 3"),
        (dict(lengths=jnp.zeros((3,), jnp.int32)), ValueError, "lengths"),
        (dict(lengths=jnp.zeros((2,))), ValueError, "integer"),
        (dict(k_cache=jnp.zeros((2, 16, 3, 8)), v_cache=jnp.zeros((2, 16, 3, 8))), ValueError,
         "multiple of"),
        (dict(implementation="cudnn"), ValueError, "no decode kernel"),
        (dict(implementation="triton"), ValueError, "implementation must be one of"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(change, error, message):
    q, k, v = _inputs(2, 16, 4, 2, 8, jnp.float32)
    args = dict(q=q, k_cache=k, v_cache=v, lengths=jnp.array([3, 16], jnp.int32)) | change
    with pytest.raises(error, match=message):
        decode_attention(
            args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("lengths"), **args
        )


def test_auto_on_cpu_is_the_reference():
    q, k, v = _inputs(2, 16, 4, 2, 8, jnp.float32)
    lengths = jnp.array([3, 16], jnp.int32)
    np.testing.assert_array_equal(
        decode_attention(q, k, v, lengths), decode_attention_reference(q, k, v, lengths)
    )
