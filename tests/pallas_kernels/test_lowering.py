"""The kernels lower for their real targets on this CPU-only machine: Triton for ``cuda``
and Mosaic for ``tpu``, flash forward and backward (through ``jax.vjp``) and decode, and
the MoE grouped matmuls ``gmm`` / ``tgmm`` (Triton; megablox) forward and backward, and
ragged paged attention (our Triton kernel; jax's Mosaic kernel).

Lowering is not compiling (Triton's and Mosaic's own compilers only run on the device),
but it runs every kernel body through the target's Pallas lowering, which interpret mode
never does. Nothing here is skipped: if a platform cannot be lowered, the test fails.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels import (
    attention,
    context_attention,
    decode_attention,
    gmm,
    platform,
    ragged_paged_attention,
    tgmm,
)
from pallas_kernels.attention import flash_gpu
from pallas_kernels.moe import gpu as moe_gpu

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
    monkeypatch.setattr(platform, "backend", lambda: "gpu")


@pytest.fixture
def tpu_backend(monkeypatch):
    """Dispatch as on a TPU host (the Mosaic kernels)."""
    monkeypatch.setattr(platform, "backend", lambda: "tpu")


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


# ---------------------------------------------------------------------------
# MoE grouped matmuls (pallas_kernels.moe): gmm / tgmm, forward and backward.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target, backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_ring_attention_blocks_lower_to_the_flash_kernels(monkeypatch, target, backend):
    """Ring attention's per-block compute on a ring of 4 (bf16, GQA, packed documents):
    step 0 is one kernel call, each later step a ``lax.cond`` between two half-block calls;
    the backward (dK/dV and dQ kernels) walks the same blocks."""
    monkeypatch.setattr(platform, "backend", lambda: backend)
    mesh = jax.make_mesh((4,), ("sequence",), axis_types=(AxisType.Auto,))
    attend = functools.partial(context_attention, axis_name="sequence", block_impl="pallas",
                               interpret=False)  # fmt: skip
    mapped = jax.shard_map(attend, mesh=mesh, in_specs=P(None, "sequence"),
                           out_specs=P(None, "sequence"), check_vma=False)  # fmt: skip

    def grads(q, k, v, ids):
        return jax.grad(lambda *a: mapped(*a, ids).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    q, kv = ((1, 1024, 4, 128), jnp.bfloat16), ((1, 1024, 2, 128), jnp.bfloat16)
    text = _lower(grads, q, kv, kv, ((1, 1024), jnp.int32), platform=target)
    if target == "cuda":
        calls = [re.search(r'\bname = "(\w+)"', line).group(1)
                 for line in text.splitlines() if TRITON_CALL in line]  # fmt: skip
        names = ("flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq")
    else:
        calls = _mosaic_kernels(text)
        names = ("flash_attention_fwd_tpu", "flash_attention_dkv_tpu", "flash_attention_dq_tpu")
    assert sorted(calls) == sorted(names * (1 + 2 * 3)), calls


@pytest.fixture
def moe_backend(monkeypatch):
    """``set(backend)``: MoE dispatch runs as on that host, whatever this host is."""
    return lambda backend: monkeypatch.setattr(platform, "backend", lambda: backend)


def _grouped(op: str, m: int, k: int, n: int, dtype, w_dtype, *, backward: bool, **kw):
    """``(fn, arg specs)``: ``gmm`` [m, k] x [8, k, n] or ``tgmm`` [m, k] x [m, n], alone
    or with its gradients (``jax.vjp``); the weights of ``gmm`` in ``w_dtype``."""
    kw = dict(implementation="pallas", interpret=False, **kw)
    if op == "gmm":
        forward = lambda a, b, sizes: gmm(a, b, sizes, **kw)
        args, out = (((m, k), dtype), ((8, k, n), w_dtype)), ((m, n), dtype)
    else:
        forward = lambda a, b, sizes: tgmm(a, b, sizes, preferred_element_type=w_dtype, **kw)
        args, out = (((m, k), dtype), ((m, n), dtype)), ((8, k, n), w_dtype)

    def fn(a, b, sizes, d_out):
        if not backward:
            return forward(a, b, sizes)
        value, pullback = jax.vjp(lambda a, b: forward(a, b, sizes), a, b)
        return (value, *pullback(d_out))

    return fn, (*args, ((8,), jnp.int32), out)


GROUPED_CASES = {  # ragged m, k, n; bf16 compute on f32 weights; f32
    "bf16-f32-weights": (1000, 200, 300, jnp.bfloat16, jnp.float32),
    "f32": (1000, 200, 300, jnp.float32, jnp.float32),
}


@pytest.mark.parametrize("name", GROUPED_CASES)
@pytest.mark.parametrize("op", ["gmm", "tgmm"])
def test_triton_grouped_matmuls_lower_for_cuda(moe_backend, op, name):
    moe_backend("gpu")
    m, k, n, dtype, w_dtype = GROUPED_CASES[name]
    t_gmm, t_tgmm = moe_gpu.tiles_for(dtype, m, k, n)
    fn, args = _grouped(op, *GROUPED_CASES[name], backward=False)
    assert list(_triton_launches(_lower(fn, *args, platform="cuda"))) == [op]
    fn, args = _grouped(op, *GROUPED_CASES[name], backward=True)
    launches = _triton_launches(_lower(fn, *args, platform="cuda"))
    assert sorted(launches) == ["gmm", "gmm_transposed_rhs", "tgmm"]
    for kernel, tiles in (("gmm", t_gmm), ("tgmm", t_tgmm)):  # the table's launch parameters
        got = launches[kernel]
        assert (got["num_warps"], got["num_stages"]) == (tiles.num_warps, tiles.num_stages)
    if op == "gmm":  # forward over row tiles of [m, n]; d_lhs over row tiles of [m, k]
        assert launches["gmm"]["grid_x"] == -(-m // t_gmm.block_m)
        assert launches["tgmm"]["grid_x"] == -(-k // t_tgmm.block_k)


def test_auto_routes_grouped_matmul_to_triton_on_gpu(moe_backend):
    moe_backend("gpu")
    fn = lambda a, b, sizes: gmm(a, b, sizes)
    args = ((256, 128), jnp.bfloat16), ((8, 128, 128), jnp.bfloat16), ((8,), jnp.int32)
    assert list(_triton_launches(_lower(fn, *args, platform="cuda"))) == ["gmm"]


def _mosaic_results(text: str) -> list[str]:
    """Result type of every ``tpu_custom_call`` (megablox names all its kernels "kernel")."""
    calls = [line for line in text.splitlines() if MOSAIC_CALL in line]
    return sorted(re.search(r"-> (tensor<[^>]*>)", line).group(1) for line in calls)


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1000, 200, 300), (512, 1000, 640)],
    ids=["ragged-m-whole-k-n-tiles", "ragged-k-n-tiles"],
)
def test_megablox_grouped_matmuls_lower_for_tpu(moe_backend, m, k, n):
    moe_backend("tpu")
    m_pad = -(-m // 128) * 128
    gmm_out, tgmm_out = f"tensor<{m_pad}x{n}xbf16>", f"tensor<8x{k}x{n}xf32>"
    d_lhs = f"tensor<{m_pad}x{k}xbf16>"
    fn, args = _grouped("gmm", m, k, n, jnp.bfloat16, jnp.float32, backward=False)
    assert _mosaic_results(_lower(fn, *args, platform="tpu")) == [gmm_out]
    fn, args = _grouped("gmm", m, k, n, jnp.bfloat16, jnp.float32, backward=True)
    assert _mosaic_results(_lower(fn, *args, platform="tpu")) == sorted([gmm_out, d_lhs, tgmm_out])
    fn, args = _grouped("tgmm", m, k, n, jnp.bfloat16, jnp.float32, backward=True)
    assert _mosaic_results(_lower(fn, *args, platform="tpu")) == sorted([tgmm_out, d_lhs, gmm_out])


# ---------------------------------------------------------------------------
# Ragged paged attention (pallas_kernels.paged): Triton kernel; jax's Mosaic kernel.
# ---------------------------------------------------------------------------


def _paged(implementation: str, args=None, **options):
    """``(fn, arg specs)``: by default 64 packed tokens of 4 sequences over a bf16 page
    cache, GQA 4."""

    def fn(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
        meta = (kv_lens, page_indices, cu_q_lens, num_seqs)
        return ragged_paged_attention(
            q, kv_pages, *meta, sm_scale=0.1, implementation=implementation, **options
        )

    i32 = jnp.int32
    return fn, args or [((64, 8, 128), jnp.bfloat16), ((32, 16, 4, 128), jnp.bfloat16),
                        ((4,), i32), ((4, 8), i32), ((5,), i32), ((1,), i32)]  # fmt: skip


def test_triton_ragged_paged_attention_lowers_for_cuda():
    fn, args = _paged("pallas_gpu", sliding_window=32, sinks=4)
    (launch,) = _triton_launches(_lower(fn, *args, platform="cuda")).items()
    # 16 tokens x 4 heads per tile: cdiv(64, 16) + 4 sequences work items.
    assert launch == ("ragged_paged_attention", {"num_warps": 4, "num_stages": 2, "grid_x": 8})


def test_triton_paged_attention_split_over_keys_lowers_for_cuda():
    """One decode over 2048 keys (32 blocks), 2 kv heads: 2 work items x 2 heads get 4 runs
    each over the keys (FlashDecoding), and the combine runs in XLA."""
    i32 = jnp.int32
    bf16 = jnp.bfloat16
    shapes = [((1, 8, 128), bf16), ((160, 16, 4, 128), bf16), ((1,), i32), ((1, 128), i32),
              ((2,), i32), ((1,), i32)]  # fmt: skip
    fn, args = _paged("pallas_gpu", shapes)
    text = _lower(fn, *args, platform="cuda")
    (launch,) = _triton_launches(text).items()
    assert launch == ("ragged_paged_attention", {"num_warps": 4, "num_stages": 2, "grid_x": 2})
    (call,) = [line for line in text.splitlines() if TRITON_CALL in line]
    assert re.search(r"\bgrid_z = 4 : i32", call), "expected 4 runs over the keys"


def test_mosaic_ragged_paged_attention_lowers_for_tpu():
    """jax's kernel asks the device for its TPU generation: lower for a v5e by name."""
    fn, args = _paged("pallas_tpu", sliding_window=32)
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = _lower(fn, *args, platform="tpu")
    assert _mosaic_kernels(text) == ["ragged_paged_attention_kernel"]
