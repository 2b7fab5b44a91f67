"""Collective matmuls (``pallas_kernels.collectives``) against the plain collective then the
matmul, values and gradients: the ``shard_map`` + ``ppermute`` ring, one way and both ways,
on rings of 2, 3, 4 and 8 fake CPU devices (beside a ``data`` axis where they fit), several
weights against separate calls, and the Pallas TPU kernels (remote DMA, semaphores) in TPU
interpret mode with race detection."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
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

RINGS = {  # devices on the ring, rows per device, both ways
    "one-way-4": (4, 3, False),
    "both-ways-2": (2, 3, True),  # the opposite device's 3 rows arrive as 2 + 1
    "both-ways-3": (3, 3, True),  # odd ring: whole blocks only, one each way per step
    "both-ways-8": (8, 2, True),  # 4 devices both ways: test_several_weights_equal_...
}


def _mapped(fn, mesh, in_specs, out_spec, **options):
    return jax.shard_map(
        functools.partial(fn, axis_name="tensor", **options),
        mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False,
    )  # fmt: skip


def _unequal(like: jax.Array) -> jax.Array:
    """Unequal weights in [-1, 1] shaped ``like`` (quicker to compile than random ones)."""
    return jnp.sin(jnp.arange(like.size, dtype=like.dtype)).reshape(like.shape)


def _normal(seed: int):
    """Standard normal float32 arrays by shape (numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return lambda *shape: rng.standard_normal(shape, dtype=np.float32)


def _values_and_grads(fn, x, w):
    """``fn(x, w)`` and the gradients of a weighted sum of it (unequal cotangents)."""
    out, vjp = jax.vjp(fn, x, w)
    return out, *vjp(jax.tree.map(_unequal, out))


def assert_matches(ours, want, atol):
    for name, a, b in zip(("out", "dx", "dw"), ours, want, strict=True):
        for a_leaf, b_leaf in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert a_leaf.shape == b_leaf.shape and a_leaf.dtype == b_leaf.dtype, name
            np.testing.assert_allclose(a_leaf, b_leaf, atol=atol, rtol=atol, err_msg=name)


def _ring_mesh(n: int) -> Mesh:
    """``tensor=n``, beside ``data=2`` where 2 n devices exist."""
    data = 2 if 2 * n <= jax.device_count() else 1
    devices = np.array(jax.devices()[: data * n]).reshape(data, n)
    return Mesh(devices, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def mesh():
    return _ring_mesh(4)


@pytest.mark.parametrize("ring", list(RINGS))
def test_ring_equals_the_plain_collective(ring):
    n, m, bidirectional = RINGS[ring]
    mesh = _ring_mesh(n)
    normal = _normal(n)
    args = {  # odd widths per device
        "all_gather_matmul": (normal(2, n * m, 20), normal(20, 7 * n)),
        "matmul_reduce_scatter": (normal(2, n * m, 5 * n), normal(5 * n, 12)),
    }

    for op, (ours, oracle, in_specs, out_spec) in OPS.items():
        ring_op = _mapped(ours, mesh, in_specs, out_spec, bidirectional=bidirectional)
        plain_op = _mapped(oracle, mesh, in_specs, out_spec)
        got, want = (jax.jit(functools.partial(_values_and_grads, fn))(*args[op])
                     for fn in (ring_op, plain_op))  # fmt: skip
        assert_matches(got, want, atol=2e-5)


def _permutes(n: int, fn, *args) -> dict[int, int]:
    """The ``ppermute`` s in ``fn``'s jaxpr on a ring of ``n``, counted by direction."""
    text = str(jax.make_jaxpr(fn)(*args))
    return {way: text.count(f"perm=((0, {way % n}), (1, {(1 + way) % n})") for way in (1, -1)}


def test_both_ways_takes_half_the_steps():
    """On 8 devices one way takes 7 hops; both ways 3 whole blocks and a half block each way."""
    mesh = _ring_mesh(8)
    x, w = jnp.zeros((1, 16, 8)), jnp.zeros((8, 8))  # 2 rows per device
    for bidirectional, hops in ((False, {1: 7, -1: 0}), (True, {1: 4, -1: 4})):
        for ours, _, in_specs, out_spec in OPS.values():
            fn = _mapped(ours, mesh, in_specs, out_spec, bidirectional=bidirectional)
            assert _permutes(8, fn, x, w) == hops


def test_several_weights_equal_separate_calls(mesh):
    """``all_gather_matmul(x, [w1, w2, w3])``: values and gradients of a plain all-gather
    matmul per weight, by one ring forward and two backward (the reduce-scatter of ``dx``;
    ``x`` again for the weight gradients, as the forward keeps only its own rows); both ways
    on 4 devices with one row each, so the opposite device's row comes whole from one side
    (2 hops one way, 1 the other)."""
    normal = _normal(3)
    x, ws = normal(2, 4, 20), tuple(normal(20, 4 * f) for f in (3, 1, 2))
    specs = ((P("data", "tensor"), (P(None, "tensor"),) * 3), (P("data", None, "tensor"),) * 3)
    together = _mapped(matmul.all_gather_matmul, mesh, *specs, bidirectional=True)

    def one_by_one(x, ws, axis_name):
        return tuple(reference.all_gather_matmul_reference(x, w, axis_name=axis_name) for w in ws)

    separate = _mapped(one_by_one, mesh, *specs)
    got, want = jax.jit(lambda x, ws: [_values_and_grads(f, x, ws) for f in (together, separate)])(
        x, ws
    )
    assert_matches(got, want, atol=2e-5)
    assert _permutes(4, lambda x, ws: _values_and_grads(together, x, ws), x, ws) == {1: 6, -1: 3}


def test_bad_weights_are_refused(mesh):
    fn = lambda ws: _mapped(matmul.all_gather_matmul, mesh, (P(), P()), P())(jnp.zeros((4, 8)), ws)  # noqa: E731
    with pytest.raises(ValueError, match="empty list of weights"):
        jax.eval_shape(fn, [])
    with pytest.raises(ValueError, match=r"matching k, got x \(4, 8\) and w \(6, 2\)"):
        jax.eval_shape(fn, [jnp.zeros((8, 2)), jnp.zeros((6, 2))])


def test_rows_that_do_not_split_are_refused(mesh):
    x, w = jnp.zeros((2, 6, 8)), jnp.zeros((8, 4))  # 6 rows over tensor=4
    fn = _mapped(matmul.matmul_reduce_scatter, mesh, (P("data"), P()), P("data"))
    with pytest.raises(ValueError, match="6 rows of x over 4 devices.*multiple of 4"):
        jax.eval_shape(fn, x, w)


def test_pallas_tpu_kernels_in_interpret_mode_with_race_detection(run_checked_script):
    """Both kernels and their VJPs (each the other) under the TPU interpreter with remote
    DMAs between 4 fake devices and race detection. In a subprocess with a timeout: that
    interpreter can hang with several devices once a kernel buffer reaches ~128 KiB."""
    run_checked_script(
        Path(__file__).with_name("collective_matmul_tpu_interpret.py"), devices=4, timeout=300
    )


def test_tpu_kernels_take_two_dimensional_operands():
    from pallas_kernels.collectives import tpu

    with pytest.raises(ValueError, match=r"x \[rows, k\] and w \[k, f\].*any rank"):
        tpu.all_gather_matmul(jnp.zeros((2, 4, 8)), jnp.zeros((8, 4)), axis_name="tensor")


def test_the_gathered_rows_are_never_assembled():
    """Megatron-SP: ``all_gather_matmul``'s forward keeps this device's rows, and its backward
    passes them around the ring again for the weight gradient, so no buffer of the gathered
    ``x`` (``[rows x devices, k]``) exists in the compiled forward-and-backward program: what a
    sequence-parallel layer keeps for backward falls with the ring size."""
    fn, _, in_specs, out_spec = OPS["all_gather_matmul"]
    mapped = _mapped(fn, _ring_mesh(4), in_specs, out_spec)
    x, w = jnp.ones((2, 12, 20)), jnp.ones((20, 28))  # per device x [1, 3, 20], w [20, 7]
    hlo = jax.jit(lambda x, w: _values_and_grads(mapped, x, w)).lower(x, w).compile().as_text()
    assert "[1,12,20]" not in hlo
