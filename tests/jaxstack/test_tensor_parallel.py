"""The tensor-parallel projections of ``jaxstack.layers.tensor_parallel`` on their own: each
implementation of the column (all-gather, matmul) and row (matmul, reduce-scatter) steps
equals the plain collective, values and gradients; the Pallas TPU kernels' batch reordering
is checked in TPU interpret mode; the kernels are picked only on TPU and within VMEM, the
ring runs both ways on TPU; several projections of one input gather it once."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.layers import tensor_parallel
from jaxstack.mesh import make_mesh


def test_pallas_tpu_projections_in_interpret_mode(run_checked_script):
    """The column (two kernels at once) and row projections through the Pallas TPU kernels
    (batch rows reordered around the kernels' 2-D row blocks) against the plain collective
    and plain einsum, values and gradients, on 4 fake devices under the TPU interpreter with
    race detection. In a subprocess with a timeout: that interpreter can hang on larger
    buffers."""
    run_checked_script(
        Path(__file__).with_name("tensor_parallel_tpu_interpret.py"), devices=4, timeout=300
    )


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
