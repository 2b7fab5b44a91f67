"""The tensor-parallel projections of ``jaxstack.layers.tensor_parallel`` on their own: each
implementation of the column (all-gather, matmul) and row (matmul, reduce-scatter) steps
equals the plain collective, values and gradients; the Pallas TPU kernels' batch reordering
is checked in TPU interpret mode; the kernels are picked only on TPU and within VMEM."""

import os
import subprocess
import sys

from jaxstack.layers import tensor_parallel

TPU_INTERPRET_SCRIPT = """
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
from jaxstack.layers import tensor_parallel as tp
from jaxstack.mesh import make_mesh

params = pltpu.InterpretParams(detect_races=True)
tp.OPS["interpreted"] = (functools.partial(tp.tpu_all_gather_matmul, interpret=params),
                         functools.partial(tp.tpu_matmul_reduce_scatter, interpret=params))
dims = (((2,), (0,)), ((), ()))
keys = jax.random.split(jax.random.key(2), 3)
x = jax.random.normal(keys[0], (2, 8, 6))  # [b, s, d]: 2 tokens per device, odd width
wq = jax.random.normal(keys[1], (6, 4, 2)) / 6**0.5  # column: [d, heads, head_dim]
wo = jax.random.normal(keys[2], (4, 2, 6)) / 8**0.5  # row: [heads, head_dim, d]

def block(impl, x, wq, wo):
    h = tp.column_dot_general(impl)(x, wq, dims)
    y = tp.row_dot_general(impl)(h, wo, (((2, 3), (0, 1)), ((), ())))
    return jnp.sum(y * jnp.cos(y)), y

with jax.set_mesh(make_mesh(tensor=4)):
    got = jax.jit(jax.value_and_grad(functools.partial(block, "interpreted"), (0, 1, 2),
                                     has_aux=True))(x, wq, wo)
    want = jax.jit(jax.value_and_grad(functools.partial(block, "collective"), (0, 1, 2),
                                      has_aux=True))(x, wq, wo)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
plain = jnp.einsum("bsd,dhk,hke->bse", x, wq, wo)
np.testing.assert_allclose(got[0][1], plain, atol=1e-5, rtol=1e-4)
assert not interpreter.races.races_found
print("checked")
"""


def test_pallas_tpu_projections_in_interpret_mode():
    """The column and row projections through the Pallas TPU kernels (batch rows reordered
    around the kernels' 2-D row blocks) against the plain collective and plain einsum,
    values and gradients, on 4 fake devices under the TPU interpreter with race detection.
    In a subprocess with a timeout: that interpreter can hang on larger buffers."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    done = subprocess.run([sys.executable, "-c", TPU_INTERPRET_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-3000:]


def test_pallas_kernels_are_picked_on_tpu_within_vmem():
    budget = tensor_parallel.TPU_VMEM_BUDGET
    assert tensor_parallel.choose_ops(budget, "tpu") == "pallas_tpu"
    assert tensor_parallel.choose_ops(budget + 1, "tpu") == "ring"
    assert tensor_parallel.choose_ops(1, "gpu") == "ring"
    assert tensor_parallel.choose_ops(1, "cpu") == "ring"
