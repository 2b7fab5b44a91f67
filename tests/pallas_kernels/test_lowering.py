"""The kernels lower for their real targets on this CPU-only machine: Triton for ``cuda``
and Mosaic for ``tpu``, flash forward and backward (through ``jax.vjp``) and decode.

Lowering is not compiling (Triton's and Mosaic's own compilers only run on the device),
but it runs every kernel body through the target's Pallas lowering, which interpret mode
never does. Nothing here is skipped: if a platform cannot be lowered, the test fails.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import attention, decode_attention, dispatch, flash_gpu

TRITON_CALL = "stablehlo.custom_call @__gpu$xla.gpu.triton"
MOSAIC_CALL = "stablehlo.custom_call @tpu_custom_call"


def _lower(fn, *args, platform: str) -> str:
    """StableHLO text of ``jit(fn)`` lowered for ``platform`` from abstract ``args``."""
    args = [jax.ShapeDtypeStruct(*a) for a in args]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _triton_launches(text: str) -> dict[str, dict[str, int]]:
    """``{kernel name: {num_warps, num_stages, grid_x}}`` of every Triton call in ``text``."""
    launches = {}
    for line in text.splitlines():
        if TRITON_CALL not in line:
            continue
        line = re.sub(r'\bir = "(?:[^"\\]|\\.)*"', "", line)  # the serialized kernel
        (name,) = re.findall(r'\bname = "(\w+)"', line)
        assert name not in launches, f"{name} launched twice"
        launches[name] = {
            key: int(re.search(rf"\b{key} = (\d+) : i32", line).group(1))
            for key in ("num_warps", "num_stages", "grid_x")
        }
    return launches


def _mosaic_kernels(text: str) -> list[str]:
    calls = [line for line in text.splitlines() if MOSAIC_CALL in line]
    return sorted(re.search(r'kernel_name = "(\w+)"', line).group(1) for line in calls)


@pytest.fixture
def gpu_backend(monkeypatch):
    """Dispatch as on a GPU host (the Triton kernels), whatever this host is."""
    monkeypatch.setattr(dispatch, "_backend", lambda: "gpu")


@pytest.fixture
def tpu_backend(monkeypatch):
    """Dispatch as on a TPU host (the Mosaic kernels)."""
    monkeypatch.setattr(dispatch, "_backend", lambda: "tpu")


def _flash(b=1, s=256, hq=4, hkv=2, d=128, dtype=jnp.bfloat16, *, backward, **kw):
    """``(fn, arg specs)``: flash attention, or its output and (dq, dk, dv)."""
    seg = kw.pop("segments", False)

    def forward(q, k, v, ids):
        return attention(q, k, v, q_segment_ids=ids, implementation="pallas", interpret=False,
                         **kw)  # fmt: skip

    def fn(q, k, v, do, ids):
        if not backward:
            return forward(q, k, v, ids)
        out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, ids), q, k, v)
        return (out, *pullback(do))

    q, kv = ((b, s, hq, d), dtype), ((b, s, hkv, d), dtype)
    ids = ((b, s), jnp.int32) if seg else None
    if ids is None:
        return lambda q, k, v, do: fn(q, k, v, do, None), (q, kv, kv, q)
    return fn, (q, kv, kv, q, ids)


TRITON_CASES = {
    "bf16-d128-gqa-segments": dict(segments=True),
    "bf16-d64-window-sinks": dict(d=64, sliding_window=100, num_sink_tokens=4),
    "f32-d96-softcap-noncausal": dict(d=96, dtype=jnp.float32, causal=False, logit_soft_cap=20.0),
}


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_flash_forward_and_backward_lower_for_cuda(gpu_backend, name):
    kw = dict(TRITON_CASES[name])
    table = flash_gpu.default_block_sizes(kw.get("d", 128), kw.get("dtype", jnp.bfloat16))
    fn, args = _flash(backward=False, **kw)
    assert list(_triton_launches(_lower(fn, *args, platform="cuda"))) == ["flash_attention_fwd"]
    fn, args = _flash(backward=True, **kw)
    launches = _triton_launches(_lower(fn, *args, platform="cuda"))
    names = ("flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq")
    assert sorted(launches) == sorted(names)
    for kernel, tiles in zip(names, table, strict=True):  # the table's launch parameters
        got = launches[kernel]
        assert (got["num_warps"], got["num_stages"]) == (tiles.num_warps, tiles.num_stages)
        blocks = tiles.block_kv if kernel == "flash_attention_dkv" else tiles.block_q
        assert got["grid_x"] == 256 // blocks, kernel


def test_triton_tile_overrides_reach_every_kernel(gpu_backend):
    fn, args = _flash(backward=True, block_q=32, block_kv=64)
    launches = _triton_launches(_lower(fn, *args, platform="cuda"))
    grid = {name: launch["grid_x"] for name, launch in launches.items()}
    assert grid == {"flash_attention_fwd": 8, "flash_attention_dkv": 4, "flash_attention_dq": 8}


def test_triton_decode_lowers_for_cuda(gpu_backend):
    def fn(q, k, v, lengths):
        return decode_attention(q, k, v, lengths, sliding_window=64, implementation="pallas",
                                interpret=False)  # fmt: skip

    cache = ((2, 512, 2, 128), jnp.bfloat16)
    text = _lower(fn, ((2, 8, 128), jnp.bfloat16), cache, cache, ((2,), jnp.int32),
                  platform="cuda")  # fmt: skip
    (launch,) = _triton_launches(text).items()
    assert launch[0] == "decode_attention"
    assert (launch[1]["num_warps"], launch[1]["num_stages"]) == (4, 2)


@pytest.mark.parametrize(
    "kw",
    [dict(segments=True), dict(d=64, sliding_window=100, num_sink_tokens=4)],
    ids=["d128-lane-dense-segments", "d64-transposed-window-sinks"],
)
def test_mosaic_flash_forward_and_backward_lower_for_tpu(tpu_backend, kw):
    fn, args = _flash(backward=False, **kw)
    assert _mosaic_kernels(_lower(fn, *args, platform="tpu")) == ["flash_attention_fwd_tpu"]
    fn, args = _flash(backward=True, **kw)
    assert _mosaic_kernels(_lower(fn, *args, platform="tpu")) == [
        "flash_attention_dkv_tpu",
        "flash_attention_dq_tpu",
        "flash_attention_fwd_tpu",
    ]


def test_mosaic_decode_lowers_for_tpu(tpu_backend):
    def fn(q, k, v, lengths):
        return decode_attention(q, k, v, lengths, implementation="pallas", interpret=False)

    cache = ((2, 512, 2, 128), jnp.bfloat16)
    text = _lower(fn, ((2, 8, 128), jnp.bfloat16), cache, cache, ((2,), jnp.int32),
                  platform="tpu")  # fmt: skip
    assert _mosaic_kernels(text) == ["decode_attention_tpu"]
