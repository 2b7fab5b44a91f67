"""The tensor-parallel projections of ``jaxstack.layers.tensor_parallel`` on their own: each
implementation of the column (all-gather, matmul) and row (matmul, reduce-scatter) steps
equals the plain collective, values and gradients; the Pallas TPU kernels' batch reordering
is checked in TPU interpret mode; the kernels are picked only on TPU and within VMEM, the
ring runs both ways on TPU; several projections of one input gather it once."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.layers import tensor_parallel
from jaxstack.mesh import make_mesh

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
keys = jax.random.split(jax.random.key(2), 4)
x = jax.random.normal(keys[0], (2, 8, 6))  # [b, s, d]: 2 tokens per device, odd width
wq = jax.random.normal(keys[1], (6, 4, 2)) / 6**0.5  # column: [d, heads, head_dim]
wk = jax.random.normal(keys[2], (6, 4, 2)) / 6**0.5
wo = jax.random.normal(keys[3], (4, 2, 6)) / 8**0.5  # row: [heads, head_dim, d]

def block(impl, x, wq, wk, wo):
    q, k = tp.column_matmuls(x, (wq, wk), impl)  # two kernels: concatenated for the kernel
    y = tp.row_dot_general(impl)(q * k, wo, (((2, 3), (0, 1)), ((), ())))
    return jnp.sum(y * jnp.cos(y)), y

with jax.set_mesh(make_mesh(tensor=4)):
    got = jax.jit(jax.value_and_grad(functools.partial(block, "interpreted"), (0, 1, 2, 3),
                                     has_aux=True))(x, wq, wk, wo)
    want = jax.jit(jax.value_and_grad(functools.partial(block, "collective"), (0, 1, 2, 3),
                                      has_aux=True))(x, wq, wk, wo)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
q, k = (jnp.einsum("bsd,dhk->bshk", x, w) for w in (wq, wk))
plain = jnp.einsum("bshk,hke->bse", q * k, wo)
np.testing.assert_allclose(got[0][1], plain, atol=1e-5, rtol=1e-4)
assert not interpreter.races.races_found
print("checked")
"""


def test_pallas_tpu_projections_in_interpret_mode():
    """The column (two kernels at once) and row projections through the Pallas TPU kernels
    (batch rows reordered around the kernels' 2-D row blocks) against the plain collective
    and plain einsum, values and gradients, on 4 fake devices under the TPU interpreter with
    race detection. In a subprocess with a timeout: that interpreter can hang on larger
    buffers."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    done = subprocess.run([sys.executable, "-c", TPU_INTERPRET_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-3000:]


def test_pallas_kernels_are_picked_on_tpu_within_vmem_and_the_ring_both_ways_on_tpu():
    budget = tensor_parallel.TPU_VMEM_BUDGET
    assert tensor_parallel.choose_ops(budget, "tpu") == "pallas_tpu"
    assert tensor_parallel.choose_ops(budget + 1, "tpu") == "ring_bidirectional"
    assert tensor_parallel.choose_ops(1, "gpu") == "ring"
    assert tensor_parallel.choose_ops(1, "cpu") == "ring"


class Projections(nn.Module):
    """Two column-parallel projections of one input, as attention's q and the MLP's up."""

    mode: str

    @nn.compact
    def __call__(self, x):
        column = tensor_parallel.dot_generals(self.mode)[0]
        layers = [nn.DenseGeneral((4, 3), dot_general=column, name="q"),
                  nn.Dense(8, dot_general=column, name="up")]  # fmt: skip
        return tensor_parallel.project(x, layers, self.mode)


def _projections_loss(mode, params, x):
    q, up = Projections(mode).apply(params, x)
    return jnp.sum(jnp.sin(q)) + jnp.sum(jnp.cos(up) * up)


@pytest.fixture(scope="module")
def projections_without_mesh():
    """Inputs and the loss's value and gradients with the layers called one by one."""
    x = np.random.default_rng(4).standard_normal((2, 8, 6), np.float32)  # 2 tokens per device
    params = jax.jit(Projections("plain").init)(jax.random.key(4), x)
    params = jax.tree.map(lambda p: p + np.linspace(0.1, 0.5, p.size).reshape(p.shape), params)
    grad = jax.jit(jax.value_and_grad(_projections_loss, (1, 2)), static_argnums=0)
    return params, x, grad, grad("plain", params, x)


@pytest.mark.parametrize(
    "mode, collectives",
    [("collective_matmul_bidirectional", {"ppermute": 4, "all_gather": 0}),
     ("sequence_parallel", {"ppermute": 0, "all_gather": 1})],
)  # fmt: skip
def test_projections_of_one_input_gather_it_once(projections_without_mesh, mode, collectives):
    """Values and gradients (input, kernels, biases) equal the layers called one by one
    without a mesh; the forward gathers the tokens once (tensor=4: a ring of 2 hops each way,
    or one all-gather)."""
    params, x, grad, want = projections_without_mesh
    with jax.set_mesh(make_mesh(data=2, tensor=4)):
        got = grad(mode, params, x)
        jaxpr = str(jax.make_jaxpr(Projections(mode).apply)(params, x))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert {name: jaxpr.count(f"{name}[") for name in collectives} == collectives


def test_projections_over_other_axes_are_refused():
    layers = [nn.DenseGeneral(4, axis=(-2, -1), parent=None)]
    with pytest.raises(ValueError, match="over the input's last axis"):
        tensor_parallel._check_projections(layers)
