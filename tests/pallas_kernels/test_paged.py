"""Ragged paged attention: the reference against dense causal attention on each gathered
sequence (and against jax's own TPU-kernel reference, which fixes the cache layout), then
the XLA path and the Triton kernel (Pallas interpret mode) against the reference; the
cache write; routing and input checks.

One batch serves every test: four sequences in use out of five slots, packed as a prefill
chunk that continues a cached prefix, a decode, a sequence with no new token, a fresh
prompt and a second decode, with padding rows after them. KV lengths end inside pages,
pages are shuffled over the cache, the unused page slots and metadata entries hold
garbage, and GQA groups are 3 (not a power of two).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as jax_rpa

from pallas_kernels import attention_reference, platform, ragged_paged_attention, write_kv_pages
from pallas_kernels.attention.masks import MaskSpec
from pallas_kernels.paged import dispatch as paged_dispatch
from pallas_kernels.paged import gpu as paged_gpu
from pallas_kernels.paged import xla as paged_xla
from pallas_kernels.paged.layout import PagedBatch
from pallas_kernels.paged.xla import default_block_keys, paged_attention_xla

PAGE_SIZE, PAGES_PER_SEQ, NUM_PAGES = 4, 5, 24
HQ, HKV, D = 6, 2, 16
SCALE = 0.3
# (new tokens, KV length incl. them) per sequence in use; T = 16 rows, 12 used.
SEQS = [(6, 17), (1, 9), (0, 5), (4, 4), (1, 13)]
NUM_TOKENS, MAX_SEQS = 16, 6
MASKS = {
    "causal": {},
    "window": dict(sliding_window=5),
    "window-sinks": dict(sliding_window=3, sinks=2),
}
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def _batch(dtype=jnp.float32, seed=0):
    """``(args, used)``: the six array arguments and the number of real rows."""
    rng = np.random.default_rng(seed)
    n = len(SEQS)
    page_indices = rng.integers(-7, 10**6, (MAX_SEQS, PAGES_PER_SEQ)).astype(np.int32)
    pages = iter(rng.permutation(NUM_PAGES))
    for i, (_, kv_len) in enumerate(SEQS):
        for p in range(-(-kv_len // PAGE_SIZE)):
            page_indices[i, p] = next(pages)
    cu = np.full(MAX_SEQS + 1, 999, np.int32)  # entries past num_seqs are garbage
    cu[: n + 1] = np.concatenate([[0], np.cumsum([q for q, _ in SEQS])])
    kv_lens = np.full(MAX_SEQS, 77, np.int32)
    kv_lens[:n] = [kv for _, kv in SEQS]
    kv_pages = rng.standard_normal((NUM_PAGES, PAGE_SIZE, 2 * HKV, D))
    q = rng.standard_normal((NUM_TOKENS, HQ, D))
    args = (
        jnp.asarray(q, dtype),
        jnp.asarray(kv_pages, dtype),
        jnp.asarray(kv_lens),
        jnp.asarray(page_indices),
        jnp.asarray(cu),
        jnp.array([n], jnp.int32),
    )
    return args, int(cu[n])


@functools.partial(jax.jit, static_argnames=("implementation", "mask"))
def _run(args, *, implementation: str, mask: str):
    return ragged_paged_attention(
        *args, sm_scale=SCALE, implementation=implementation, interpret=True, **MASKS[mask]
    )


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.fixture(scope="module")
def references(batch):
    args, _ = batch
    return {mask: _run(args, implementation="reference", mask=mask) for mask in MASKS}


def _dense_sequence(args, i):
    """Sequence ``i``'s queries ``[1, q_len, hq, d]`` and keys/values ``[1, kv_len, hkv, d]``
    gathered by hand from the pages."""
    q, kv_pages, kv_lens, page_indices, cu, _ = (np.asarray(a) for a in args)
    kv = np.concatenate([kv_pages[p] for p in page_indices[i, : -(-kv_lens[i] // PAGE_SIZE)]])
    kv = kv[: kv_lens[i]]
    return q[None, cu[i] : cu[i + 1]], kv[None, :, 0::2], kv[None, :, 1::2]


@pytest.mark.parametrize("mask", MASKS)
def test_reference_equals_dense_causal_attention_per_sequence(batch, references, mask):
    args, used = batch
    out = np.asarray(references[mask])
    options = MASKS[mask]
    for i, (q_len, _) in enumerate(SEQS):
        if q_len == 0:
            continue
        q, k, v = _dense_sequence(args, i)
        want = attention_reference(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True, scale=SCALE,
            sliding_window=options.get("sliding_window"),
            num_sink_tokens=options.get("sinks", 0),
        )  # fmt: skip
        start = int(args[4][i])
        np.testing.assert_allclose(out[start : start + q_len], want[0], atol=2e-6, rtol=0)
    assert np.all(out[used:] == 0)
    # The window and the sinks change the answer (so the cases above test them).
    assert not np.allclose(out, references["causal"]) or mask == "causal"


def test_reference_equals_jax_tpu_kernel_reference(batch, references):
    """Same layout and positions as jax's TPU kernel (K even, V odd; window convention)."""
    args, used = batch
    q, kv_pages, kv_lens, page_indices, cu, num_seqs = args
    # jax's reference slices with the lengths: jit it with them fixed.
    lengths = tuple(np.asarray(x) for x in (kv_lens, cu, num_seqs))
    want = jax.jit(
        lambda q, kv_pages, page_indices: jax_rpa.ref_ragged_paged_attention(
            q, kv_pages, lengths[0], page_indices, *lengths[1:], sm_scale=SCALE,
            sliding_window=MASKS["window"]["sliding_window"],
        )
    )(q, kv_pages, page_indices)  # fmt: skip
    np.testing.assert_allclose(references["window"][:used], want[:used], atol=2e-6, rtol=0)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_implementation_equals_reference(batch, references, implementation, mask):
    args, used = batch
    out = _run(args, implementation=implementation, mask=mask)
    np.testing.assert_allclose(out, references[mask], atol=TOL[out.dtype], rtol=0)
    assert np.all(np.asarray(out[used:]) == 0)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_bfloat16_equals_float32_reference(implementation):
    args, _ = _batch(jnp.bfloat16, seed=1)
    out = _run(args, implementation=implementation, mask="window-sinks")
    want = _run(
        tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args),
        implementation="reference",
        mask="window-sinks",
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=TOL[out.dtype], rtol=0)


@pytest.mark.parametrize("mask, tile_tokens", [("causal", 1), ("window-sinks", 3)])
def test_xla_one_page_blocks_equal_reference(batch, references, mask, tile_tokens):
    """Blocks of one page (many loop steps, the window skipping whole blocks); tiles of
    one row and of 3 rows (sequences end inside tiles)."""
    args, _ = batch
    options = MASKS[mask]
    spec = MaskSpec(
        causal=True,
        sliding_window=options.get("sliding_window"),
        num_sink_tokens=options.get("sinks", 0),
    )
    out = jax.jit(
        lambda args: paged_attention_xla(
            PagedBatch(*args), sm_scale=SCALE, mask=spec, block_keys=PAGE_SIZE
        )
    )(args)
    np.testing.assert_allclose(out, references[mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize("mask", MASKS)
def test_triton_split_over_keys_equals_reference(batch, references, mask):
    """FlashDecoding runs: one-page blocks cut into 2 and 3 runs per work item (runs with
    no visible block included: sequences hold 1-5 blocks), then combined."""
    args, used = batch
    options = MASKS[mask]
    spec = MaskSpec(
        causal=True,
        sliding_window=options.get("sliding_window"),
        num_sink_tokens=options.get("sinks", 0),
    )

    @functools.partial(jax.jit, static_argnums=1)
    def split(args, num_splits):
        out = paged_gpu.paged_attention(
            PagedBatch(*args), sm_scale=SCALE, mask=spec, interpret=True,
            num_splits=num_splits, block_keys=PAGE_SIZE,
        )  # fmt: skip
        return out[:used]

    for num_splits in (2, 3):
        np.testing.assert_allclose(split(args, num_splits), references[mask][:used], atol=2e-5)


def test_triton_splits_keys_only_for_few_items_over_long_contexts():
    assert paged_gpu.key_splits(num_items=2, hkv=8, max_blocks=64) == 8  # 16 -> 128 programs
    assert paged_gpu.key_splits(num_items=2, hkv=8, max_blocks=24) == 3  # >= 8 blocks a run
    assert paged_gpu.key_splits(num_items=2, hkv=8, max_blocks=15) == 1  # short contexts
    assert paged_gpu.key_splits(num_items=20, hkv=8, max_blocks=64) == 1  # enough programs


def test_xla_key_blocks_shrink_to_keep_a_step_in_cache():
    """One loop step's gathered blocks fit ``BLOCK_BYTES``: the full ``BLOCK_KEYS`` for a
    few tiles, a power of two fewer keys for many (a 64-row decode bucket of 4 kv heads x
    64 dims float32: 32 keys), never under one key."""
    pages = jax.ShapeDtypeStruct((8, 16, 8, 64), jnp.float32)
    assert default_block_keys(1, pages) == paged_xla.BLOCK_KEYS
    assert default_block_keys(64, pages) == 32
    for tiles in (1, 7, 16, 64, 96, 10**6):
        keys = default_block_keys(tiles, pages)
        assert keys & (keys - 1) == 0 and 1 <= keys <= paged_xla.BLOCK_KEYS
        assert keys == 1 or tiles * keys * 8 * 64 * 4 <= paged_xla.BLOCK_BYTES


def test_write_kv_pages_then_attention_sees_the_new_tokens():
    rng = np.random.default_rng(3)
    kv_pages = jnp.asarray(rng.standard_normal((NUM_PAGES, PAGE_SIZE, 2 * HKV, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, HKV, D)), jnp.float32) for _ in range(2))
    slots = jnp.array([7 * PAGE_SIZE + 3, -1, 2 * PAGE_SIZE, 7 * PAGE_SIZE], jnp.int32)
    out = jax.jit(write_kv_pages)(kv_pages, k, v, slots)
    want = np.array(kv_pages)
    for t, slot in enumerate(np.asarray(slots)):
        if slot >= 0:
            want[slot // PAGE_SIZE, slot % PAGE_SIZE, 0::2] = k[t]
            want[slot // PAGE_SIZE, slot % PAGE_SIZE, 1::2] = v[t]
    np.testing.assert_array_equal(out, want)  # every other slot untouched
    # A sequence on pages [2, 7] of length 8 whose last token was just written.
    q = jnp.asarray(rng.standard_normal((1, HQ, D)), jnp.float32)
    meta = (jnp.array([8]), jnp.array([[2, 7]]), jnp.array([0, 1]), jnp.array([1]))
    meta = tuple(m.astype(jnp.int32) for m in meta)
    got = jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE))(q, out, *meta)
    kv = jnp.concatenate([out[2], out[7]])  # [8, 2 * HKV, D]
    dense = attention_reference(q[None], kv[None, :, 0::2], kv[None, :, 1::2], scale=SCALE)
    np.testing.assert_allclose(got, dense[0], atol=2e-6, rtol=0)


def test_write_kv_pages_rejects_mismatched_shapes():
    kv_pages = jnp.zeros((NUM_PAGES, PAGE_SIZE, 2 * HKV, D))
    with pytest.raises(ValueError, match=r"k and v must both have shape \[T, 2, 16\]"):
        write_kv_pages(kv_pages, jnp.zeros((3, HKV + 1, D)), jnp.zeros((3, HKV + 1, D)),
                       jnp.zeros(3, jnp.int32))  # fmt: skip
    with pytest.raises(ValueError, match=r"slot_mapping must be an integer array of shape"):
        write_kv_pages(kv_pages, jnp.zeros((3, HKV, D)), jnp.zeros((3, HKV, D)),
                       jnp.zeros(4, jnp.int32))  # fmt: skip


@pytest.mark.parametrize(
    "backend, options, dtype, want",
    [
        ("cpu", {}, jnp.float32, ("xla", None)),
        ("gpu", dict(sliding_window=4, sinks=2), jnp.bfloat16, ("pallas_gpu", None)),
        ("tpu", dict(sliding_window=4), jnp.bfloat16, ("xla", "head_dim a multiple of 128")),
        ("tpu", dict(sliding_window=4, sinks=2), jnp.bfloat16, ("xla", "no attention sinks")),
    ],
)
def test_auto_route(monkeypatch, backend, options, dtype, want):
    monkeypatch.setattr(platform, "backend", lambda: backend)
    q, kv_pages = jnp.zeros((8, HQ, D), dtype), jnp.zeros((4, 16, 2 * HKV, D), dtype)
    route, reason = paged_dispatch.auto_route(q, kv_pages, options.get("sinks"))
    assert route == want[0]
    assert (reason is None) if want[1] is None else (want[1] in reason)


def test_auto_route_tpu_kernel_for_lane_dense_heads(monkeypatch):
    monkeypatch.setattr(platform, "backend", lambda: "tpu")
    q, kv = jnp.zeros((8, 4, 128), jnp.bfloat16), jnp.zeros((4, 16, 4, 128), jnp.bfloat16)
    assert paged_dispatch.auto_route(q, kv, None) == ("pallas_tpu", None)


def test_gpu_kernel_rejects_what_it_cannot_run(batch):
    (q, kv_pages, *meta), _ = batch
    odd_pages = jnp.zeros((NUM_PAGES, 6, 2 * HKV, D))
    with pytest.raises(ValueError, match="page_size must be a power of two.*Use 'auto'"):
        ragged_paged_attention(q, odd_pages, *meta, sm_scale=1.0, implementation="pallas_gpu")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(kv_lens=jnp.zeros(MAX_SEQS, jnp.float32)), r"kv_lens must be int32 of shape \(6,\)"),
        (dict(cu_q_lens=jnp.zeros(MAX_SEQS, jnp.int32)), r"cu_q_lens must be int32 of shape"),
        (dict(num_seqs=jnp.int32(2)), r"num_seqs must be int32 of shape \(1,\)"),
        (dict(kv_pages=jnp.zeros((4, 4, 5, D))), r"2 \* kv_heads.*got shape \(4, 4, 5, 16\)"),
        (dict(kv_pages=jnp.zeros((4, 4, 8, D))), r"query heads \(6\) must be a multiple of"),
        (dict(q=jnp.zeros((NUM_TOKENS, HQ, 8))), r"must agree on head_dim"),
        (dict(sliding_window=0), r"sliding_window must be an int >= 1 or None"),
        (dict(sinks=-1), r"sinks must be an int >= 0 or None"),
        (dict(implementation="cudnn"), r"implementation must be one of"),
    ],
    ids=lambda x: None if isinstance(x, str) else "-".join(x),
)
def test_bad_input_is_named(batch, change, match):
    (q, kv_pages, kv_lens, page_indices, cu, num_seqs), _ = batch
    kw = dict(q=q, kv_pages=kv_pages, kv_lens=kv_lens, page_indices=page_indices,
              cu_q_lens=cu, num_seqs=num_seqs, sm_scale=1.0)  # fmt: skip
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(**kw)
