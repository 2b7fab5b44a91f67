"""The column (two kernels at once) and row projections through the Pallas TPU kernels
against the plain collective and plain einsum, values and gradients, on 4 fake devices under
the TPU interpreter with race detection. Run by ``test_tensor_parallel.py`` in a subprocess;
prints ``checked``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
from jax.experimental.pallas import tpu as pltpu

from jaxstack.layers import tensor_parallel as tp
from jaxstack.mesh import make_mesh


def block(impl: str, x, wq, wk, wo):
    q, k = tp.column_matmuls(x, (wq, wk), impl)  # two kernels: concatenated for the kernel
    y = tp.row_dot_general(impl)(q * k, wo, (((2, 3), (0, 1)), ((), ())))
    return jnp.sum(y * jnp.cos(y)), y


def main() -> None:
    params = pltpu.InterpretParams(detect_races=True)
    tp.OPS["interpreted"] = (
        functools.partial(tp.tpu_all_gather_matmul, interpret=params),
        functools.partial(tp.tpu_matmul_reduce_scatter, interpret=params),
    )
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (2, 8, 6))  # [b, s, d]: 2 tokens per device, odd width
    wq = jax.random.normal(keys[1], (6, 4, 2)) / 6**0.5  # column: [d, heads, head_dim]
    wk = jax.random.normal(keys[2], (6, 4, 2)) / 6**0.5
    wo = jax.random.normal(keys[3], (4, 2, 6)) / 8**0.5  # row: [heads, head_dim, d]
    grads = functools.partial(jax.value_and_grad, argnums=(0, 1, 2, 3), has_aux=True)
    with jax.set_mesh(make_mesh(tensor=4)):
        got = jax.jit(grads(functools.partial(block, "interpreted")))(x, wq, wk, wo)
        want = jax.jit(grads(functools.partial(block, "collective")))(x, wq, wk, wo)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    q, k = (jnp.einsum("bsd,dhk->bshk", x, w) for w in (wq, wk))
    plain = jnp.einsum("bshk,hke->bse", q * k, wo)
    np.testing.assert_allclose(got[0][1], plain, atol=1e-5, rtol=1e-4)
    assert not interpreter.races.races_found
    print("checked")


if __name__ == "__main__":
    main()
