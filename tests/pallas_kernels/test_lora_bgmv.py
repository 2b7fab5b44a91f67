"""The batched LoRA matmul: the Triton kernel (interpret mode) and the XLA form against the
per-token reference, over mixed adapters (-1 included), unequal ranks and odd shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora import gpu, lora_bgmv, lora_bgmv_reference, rank_bucket, stack_adapters


def problem(t, d_in, d_out, ranks, dtype, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [(rng.normal(size=(d_in, r)).astype(np.float32),
              rng.normal(size=(r, d_out)).astype(np.float32)) for r in ranks]  # fmt: skip
    a, b = stack_adapters([(jnp.asarray(a), jnp.asarray(b)) for a, b in pairs])
    x = jnp.asarray(rng.normal(size=(t, d_in)), dtype)
    idx = jnp.asarray(np.r_[-1, 0, 1, rng.integers(-1, len(ranks), t - 3)], jnp.int32)
    scale = jnp.asarray([2.0 / r for r in ranks], jnp.float32)
    return x, a.astype(dtype), b.astype(dtype), idx, scale, pairs


@pytest.mark.parametrize(
    "implementation, t, d_in, d_out, ranks, dtype",
    [
        # odd sizes over two k and two column blocks, three ranks padded to 8
        ("pallas", 6, 200, 160, (4, 8, 3), jnp.float32),
        ("xla", 13, 40, 24, (4, 8, 3), jnp.float32),
        ("xla", 8, 64, 160, (16, 5), jnp.bfloat16),
    ],
)
def test_bgmv_matches_reference(implementation, t, d_in, d_out, ranks, dtype):
    x, a, b, idx, scale, pairs = problem(t, d_in, d_out, ranks, dtype)
    assert a.shape[-1] == rank_bucket(max(ranks))
    want = np.asarray(lora_bgmv_reference(x, a, b, idx, scale), np.float32)
    got = lora_bgmv(x, a, b, idx, scale, implementation=implementation)
    assert got.dtype == x.dtype and got.shape == (t, d_out)
    tol = (1e-4 if dtype == jnp.float32 else 3e-2) * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol)
    # the reference is the math: each token alone through its own unpadded adapter
    as_dtype = lambda v: np.asarray(jnp.asarray(v, dtype), np.float32)  # noqa: E731
    xs = as_dtype(x)
    for token, i in enumerate(np.asarray(idx)):
        alone = 0 if i < 0 else xs[token] @ as_dtype(pairs[i][0]) @ as_dtype(pairs[i][1])
        np.testing.assert_allclose(want[token], alone * float(scale[max(i, 0)]), atol=tol)


def test_bad_shapes_are_refused():
    x, a, b, idx, scale, _ = problem(4, 16, 8, (4,), jnp.float32)
    with pytest.raises(ValueError, match="do not chain"):
        lora_bgmv(x, a, b[:, :2], idx, scale)
    with pytest.raises(ValueError, match="one per adapter"):
        lora_bgmv(x, a, b, idx, jnp.ones(3))
    with pytest.raises(ValueError, match="exceeds the largest rank bucket"):
        rank_bucket(1000)


def test_triton_kernel_lowers_for_cuda():
    """Lowering (not compiling) runs the kernel body through Pallas' Triton lowering, which
    interpret mode never does."""
    shapes = [((6, 200), jnp.bfloat16), ((3, 200, 8), jnp.bfloat16), ((3, 8, 160), jnp.bfloat16),
              ((6,), jnp.int32), ((3,), jnp.float32)]  # fmt: skip
    args = [jax.ShapeDtypeStruct(*s) for s in shapes]
    lowered = jax.jit(gpu.lora_bgmv).trace(*args).lower(lowering_platforms=("cuda",))
    assert 'name = "lora_bgmv"' in lowered.as_text()
