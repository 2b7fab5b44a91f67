"""Run ``pred_fn`` over a dataset on a mesh, in order, padding the last batch."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxstack.mesh import batch_divisor, batch_sharding


class Predictor:
    """Inference with the user's ``collate_fn`` and ``pred_fn(params, batch, rng) -> dict``.

    ``pred_fn`` returns per-example outputs (leading dim = batch); they come back as host
    numpy arrays for the whole dataset, in dataset order.
    """

    def __init__(
        self,
        *,
        collate_fn: Callable[[list], dict[str, np.ndarray]],
        pred_fn: Callable[[Any, dict, jax.Array], dict],
        mesh: Mesh,
        seed: int = 0,
    ):
        self.collate_fn, self.pred_fn, self.mesh = collate_fn, pred_fn, mesh
        self.rng = jax.random.PRNGKey(seed)
        self._pred = jax.jit(pred_fn)

    def predict(self, params, dataset: Sequence, batch_size: int) -> dict[str, np.ndarray]:
        """Outputs for every example; the final partial batch is padded, then trimmed."""
        divisor = batch_divisor(self.mesh)
        if batch_size % (divisor * jax.process_count()):
            raise ValueError(
                f"prediction batch_size={batch_size} must be a multiple of the "
                f"{divisor} batch shards x {jax.process_count()} processes"
            )
        if len(dataset) == 0:
            raise ValueError("cannot predict on an empty dataset")
        local = batch_size // jax.process_count()
        outputs: list[dict] = []
        for start in range(0, len(dataset), batch_size):
            indices = [min(i, len(dataset) - 1) for i in range(start, start + batch_size)]
            mine = indices[jax.process_index() * local : (jax.process_index() + 1) * local]
            batch = self.collate_fn([dataset[i] for i in mine])
            global_batch = {
                name: jax.make_array_from_process_local_data(
                    batch_sharding(self.mesh, np.ndim(v)), np.asarray(v)
                )
                for name, v in batch.items()
            }
            rng = jax.random.fold_in(self.rng, start)
            with jax.set_mesh(self.mesh):
                out = self._pred(params, global_batch, rng)
            if not isinstance(out, dict):
                raise TypeError(f"pred_fn must return a dict of arrays, got {type(out).__name__}")
            outputs.append(jax.tree.map(_to_host, out))
        return {
            name: np.concatenate([o[name] for o in outputs])[: len(dataset)] for name in outputs[0]
        }


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
