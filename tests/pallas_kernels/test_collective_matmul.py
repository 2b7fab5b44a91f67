"""Collective matmuls (``pallas_kernels.collectives``) against the plain collective then the
matmul, values and gradients: the ``shard_map`` + ``ppermute`` ring on ``data=2 x tensor=4``
fake CPU devices, and the Pallas TPU kernels (remote DMA, semaphores) in TPU interpret mode
with race detection."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.collectives import matmul, reference

# (ours, oracle, in_specs, out_spec): all-gather of x's rows before a column-parallel w;
# reduce-scatter of the rows after a row-parallel w (x's features split like w's rows)
OPS = {
    "all_gather_matmul": (
        matmul.all_gather_matmul, reference.all_gather_matmul_reference,
        (P("data", "tensor"), P(None, "tensor")), P("data", None, "tensor"),
    ),
    "matmul_reduce_scatter": (
        matmul.matmul_reduce_scatter, reference.matmul_reduce_scatter_reference,
        (P("data", None, "tensor"), P("tensor", None)), P("data", "tensor"),
    ),
}  # fmt: skip


def _mapped(fn, mesh, in_specs, out_spec, **options):
    return jax.shard_map(
        functools.partial(fn, axis_name="tensor", **options),
        mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False,
    )  # fmt: skip


def _values_and_grads(fn, x, w, seed: int = 5):
    """``fn(x, w)`` and the gradients of a weighted sum of it (unequal cotangents)."""
    out, vjp = jax.vjp(fn, x, w)
    weights = jax.random.normal(jax.random.key(seed), out.shape, out.dtype)
    return out, *vjp(weights)


def assert_matches(ours, want, atol):
    for name, a, b in zip(("out", "dx", "dw"), ours, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, atol=atol, rtol=atol, err_msg=name)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("op", list(OPS))
def test_ring_equals_the_plain_collective(mesh, op):
    ours, oracle, in_specs, out_spec = OPS[op]
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 12, 20), jnp.float32)  # 3 rows per device, odd widths
    w = jax.random.normal(kw, (20, 28), jnp.float32)
    got = jax.jit(lambda x, w: _values_and_grads(_mapped(ours, mesh, in_specs, out_spec), x, w))(
        x, w
    )
    want = jax.jit(lambda x, w: _values_and_grads(_mapped(oracle, mesh, in_specs, out_spec), x, w))(
        x, w
    )
    assert_matches(got, want, atol=2e-5)


def test_rows_that_do_not_split_are_refused(mesh):
    x, w = jnp.zeros((2, 6, 8)), jnp.zeros((8, 4))  # 6 rows over tensor=4
    fn = _mapped(matmul.matmul_reduce_scatter, mesh, (P("data"), P()), P("data"))
    with pytest.raises(ValueError, match="6 rows of x over 4 devices.*multiple of 4"):
        jax.eval_shape(fn, x, w)


TPU_INTERPRET_SCRIPT = """
import sys, functools
import jax, jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
sys.path.insert(0, {here!r})
import test_collective_matmul as t
from pallas_kernels.collectives import reference, tpu
mesh = jax.make_mesh((4,), ("tensor",), axis_types=(AxisType.Auto,))
kx, kw = jax.random.split(jax.random.key(1))
x, w = jax.random.normal(kx, (16, 8)), jax.random.normal(kw, (8, 16))  # ~1 KiB buffers
params = pltpu.InterpretParams(detect_races=True)
for ours, oracle, in_specs, out_spec in (
    (tpu.all_gather_matmul, reference.all_gather_matmul_reference,
     (P("tensor"), P(None, "tensor")), P(None, "tensor")),
    (tpu.matmul_reduce_scatter, reference.matmul_reduce_scatter_reference,
     (P(None, "tensor"), P("tensor")), P("tensor")),
):
    got = jax.jit(functools.partial(t._values_and_grads, t._mapped(
        ours, mesh, in_specs, out_spec, interpret=params)))(x, w)
    want = jax.jit(functools.partial(t._values_and_grads, t._mapped(
        oracle, mesh, in_specs, out_spec)))(x, w)
    t.assert_matches(got, want, atol=2e-5)
    assert not interpreter.races.races_found, ours.__name__
print("checked")
"""


def test_pallas_tpu_kernels_in_interpret_mode_with_race_detection():
    """Both kernels and their VJPs (each the other) under the TPU interpreter with remote
    DMAs between 4 fake devices and race detection. In a subprocess with a timeout: that
    interpreter can hang with several devices once a kernel buffer reaches ~128 KiB."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    script = TPU_INTERPRET_SCRIPT.format(here=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-3000:]


def test_tpu_kernels_take_two_dimensional_operands():
    from pallas_kernels.collectives import tpu

    with pytest.raises(ValueError, match=r"x \[rows, k\] and w \[k, f\].*any rank"):
        tpu.all_gather_matmul(jnp.zeros((2, 4, 8)), jnp.zeros((8, 4)), axis_name="tensor")
