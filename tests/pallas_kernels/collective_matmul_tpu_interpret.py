"""Both collective-matmul kernels and their VJPs (each the other) under the TPU interpreter
with remote DMAs between 4 fake devices and race detection, against the reference. Run by
``test_collective_matmul.py`` in a subprocess with 4 fake devices; prints ``checked``."""

import functools

import jax
import test_collective_matmul as t
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.collectives import reference, tpu


def main() -> None:
    mesh = jax.make_mesh((4,), ("tensor",), axis_types=(AxisType.Auto,))
    kx, kw = jax.random.split(jax.random.key(1))
    x, w = jax.random.normal(kx, (16, 8)), jax.random.normal(kw, (8, 16))  # ~1 KiB buffers
    params = pltpu.InterpretParams(detect_races=True)
    cases = (
        (tpu.all_gather_matmul, reference.all_gather_matmul_reference,
         (P("tensor"), P(None, "tensor")), P(None, "tensor")),
        (tpu.matmul_reduce_scatter, reference.matmul_reduce_scatter_reference,
         (P(None, "tensor"), P("tensor")), P("tensor")),
    )  # fmt: skip
    for ours, oracle, in_specs, out_spec in cases:
        mapped = t._mapped(ours, mesh, in_specs, out_spec, interpret=params)
        got = jax.jit(functools.partial(t._values_and_grads, mapped))(x, w)
        want_fn = t._mapped(oracle, mesh, in_specs, out_spec)
        want = jax.jit(functools.partial(t._values_and_grads, want_fn))(x, w)
        t.assert_matches(got, want, atol=2e-5)
        assert not interpreter.races.races_found, ours.__name__
    print("checked")


if __name__ == "__main__":
    main()
