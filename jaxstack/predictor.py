"""Run ``pred_fn`` over a dataset on a mesh, in order, padding the last batch."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstack.auto import choose_mesh_for
from jaxstack.checkpoint import load_params, saved_param_shapes
from jaxstack.mesh import MeshSpec, batch_divisor, batch_sharding, resolve_mesh
from jaxstack.step import cast_floating
from sharding_rules import ModelAnalysis, analyze_model, param_rules, specs_tree


class Predictor:
    """Inference with the user's ``collate_fn`` and ``pred_fn(params, batch, rng) -> dict``.

    ``pred_fn`` returns per-example outputs (leading dim = batch); they come back as host
    numpy arrays for the whole dataset, in dataset order.

    Parameters are placed on ``mesh`` by the automatic sharding rules traced from
    ``pred_fn`` (or by ``param_specs``): params that live elsewhere (loaded on one device,
    say) are resharded on first use, and ``load_params(work_dir)`` reads a checkpoint
    straight into the placement. ``mesh`` takes the same spellings as the Trainer's,
    ``"auto"`` included (chosen on the first batch from the traced ``pred_fn``, planning
    parameters only). ``compute_dtype`` casts floating params before ``pred_fn`` (mixed
    precision).
    """

    def __init__(
        self,
        *,
        collate_fn: Callable[[list], dict[str, np.ndarray]],
        pred_fn: Callable[[Any, dict, jax.Array], dict],
        mesh: MeshSpec = None,
        seed: int = 0,
        param_specs: Any = None,
        sharding_overrides: dict[str, PartitionSpec] | None = None,
        compute_dtype: str | None = None,
    ):
        self.collate_fn, self.pred_fn = collate_fn, pred_fn
        self._auto_mesh = isinstance(mesh, str) and mesh.strip() == "auto"
        self.mesh: Mesh | None = None if self._auto_mesh else resolve_mesh(mesh)
        self.rng = jax.random.PRNGKey(seed)
        self.param_specs = param_specs
        self.sharding_overrides = sharding_overrides
        self.compute_dtype = compute_dtype
        self._pred = None

    def _batch(self, dataset: Sequence, indices: list[int]) -> dict[str, jax.Array]:
        local = len(indices) // jax.process_count()
        mine = indices[jax.process_index() * local : (jax.process_index() + 1) * local]
        batch = self.collate_fn([dataset[i] for i in mine])
        return {
            name: jax.make_array_from_process_local_data(
                batch_sharding(self.mesh, np.ndim(v)), np.asarray(v)
            )
            for name, v in batch.items()
        }

    def _analysis(self, params: Any, batch: dict) -> ModelAnalysis:
        """The rules' trace of ``pred_fn`` on ``params`` and ``batch`` (global) shapes."""
        shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        return analyze_model(self.pred_fn, jax.tree.map(shape, params),
                             jax.tree.map(shape, batch), rng)  # fmt: skip

    def _choose_mesh(self, params: Any, host_batch: dict[str, np.ndarray]) -> None:
        """``mesh="auto"``: the cheapest fitting mesh for ``pred_fn`` (``jaxstack.auto``)."""
        if self.mesh is not None:
            return
        batch = {
            name: jax.ShapeDtypeStruct(
                (np.shape(v)[0] * jax.process_count(), *np.shape(v)[1:]), np.asarray(v).dtype
            )
            for name, v in host_batch.items()
        }
        analysis = self._analysis(params, batch)
        self.mesh = choose_mesh_for(
            analysis,
            params,
            batch_size=next(iter(batch.values())).shape[0],
            overrides=self.sharding_overrides,
            training=False,
            activation_dtype=self.compute_dtype,
        )
        if self.param_specs is None:
            rules = param_rules(analysis, self.mesh, self.sharding_overrides)
            self.param_specs = specs_tree(analysis, rules)

    def _specs_for(self, params: Any, example_batch: dict[str, jax.Array]) -> Any:
        if self.param_specs is None:
            analysis = self._analysis(params, example_batch)
            rules = param_rules(analysis, self.mesh, self.sharding_overrides)
            self.param_specs = specs_tree(analysis, rules)
        return self.param_specs

    def place(self, params: Any, example_batch: dict[str, jax.Array]) -> Any:
        """``params`` laid out on this predictor's mesh by the rules (no copy if they are);
        ``example_batch`` is a global batch as ``predict`` builds it."""
        shardings = jax.tree.map(
            lambda s: NamedSharding(self.mesh, s), self._specs_for(params, example_batch)
        )
        placed = jax.tree.map(
            lambda x, s: x if getattr(x, "sharding", None) == s else jax.device_put(x, s),
            params,
            shardings,
        )
        if self._pred is None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            predict = lambda p, batch, rng: self.pred_fn(  # noqa: E731
                cast_floating(p, self.compute_dtype), batch, rng
            )
            batch_shardings = jax.tree.map(lambda x: x.sharding, example_batch)
            self._pred = jax.jit(predict, in_shardings=(shardings, batch_shardings, replicated))
        return placed

    def load_params(self, work_dir: str | Path, example_batch: dict, step: int | None = None):
        """The params of a run's checkpoint, read straight into this predictor's placement
        (the rules traced from ``pred_fn`` on ``example_batch``, a host-local batch)."""
        shapes = saved_param_shapes(work_dir, step)
        self._choose_mesh(shapes, example_batch)
        batch = {
            name: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
            for name, v in example_batch.items()
        }
        specs = self._specs_for(shapes, batch)
        return load_params(work_dir, step=step, mesh=self.mesh, param_specs=specs)

    def predict(self, params, dataset: Sequence, batch_size: int) -> dict[str, np.ndarray]:
        """Outputs for every example; the final partial batch is padded, then trimmed."""
        if len(dataset) == 0:
            raise ValueError("cannot predict on an empty dataset")
        local = batch_size // jax.process_count()
        self._choose_mesh(params, self.collate_fn([dataset[min(i, len(dataset) - 1)]
                                                   for i in range(local)]))  # fmt: skip
        divisor = batch_divisor(self.mesh)
        if batch_size % (divisor * jax.process_count()):
            raise ValueError(
                f"prediction batch_size={batch_size} must be a multiple of the "
                f"{divisor} batch shards x {jax.process_count()} processes"
            )
        outputs: list[dict] = []
        for start in range(0, len(dataset), batch_size):
            indices = [min(i, len(dataset) - 1) for i in range(start, start + batch_size)]
            global_batch = self._batch(dataset, indices)
            if start == 0:
                params = self.place(params, global_batch)
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
