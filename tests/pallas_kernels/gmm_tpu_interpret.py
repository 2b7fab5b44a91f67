"""megablox under the TPU-faithful interpreter (kernel buffers start as NaN, out-of-bounds
reads raise) against the ``ragged_dot`` reference, for the group layouts that break tiling.
Run by ``test_gmm.py`` in a single-device subprocess; prints ``checked``."""

import jax.numpy as jnp
import test_gmm as t
from jax.experimental.pallas import tpu as pltpu


def main() -> None:
    for groups in ("empty-groups", "uneven", "rows-past-total"):
        args = (*t._inputs("bf16-f32-weights"), jnp.array(t.GROUPS[groups], jnp.int32))
        ours = t._kernel_run(
            *args, backend="tpu", tiling=(128, 128, 128), interpret=pltpu.InterpretParams()
        )
        t._assert_close(ours, t._reference_run(*args), "bf16-f32-weights")
    print("checked")


if __name__ == "__main__":
    main()
