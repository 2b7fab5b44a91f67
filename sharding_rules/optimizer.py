"""Optimizer state follows its parameter.

Optax states nest the parameter tree inside their own (``ScaleByAdamState.mu``,
``MultiStepsState.acc_grads``, a ``chain``'s tuple), so a state leaf whose path *ends with*
a parameter's path and has that parameter's shape is a per-parameter buffer and takes the
parameter's spec. Everything else (step counts, factored statistics of another shape) is
replicated.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from sharding_rules.paths import path_keys


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def optimizer_state_specs(opt_state: Any, params: Any, param_specs: Any) -> Any:
    """A PartitionSpec for every optimizer-state leaf, as a pytree shaped like ``opt_state``.

    Args:
      opt_state: the optax state, arrays or ``ShapeDtypeStruct`` (``jax.eval_shape(tx.init,
        params)``).
      params: the parameters (or their shapes) the state was built from.
      param_specs: a PartitionSpec per parameter, shaped like ``params``.

    Returns:
      For each state leaf: its parameter's spec when the leaf's path ends with that
      parameter's path (longest match) and the shapes agree, else ``PartitionSpec()``.

    Raises:
      ValueError: if ``param_specs`` is not shaped like ``params``.
    """
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    s_flat, s_def = jax.tree_util.tree_flatten(param_specs, is_leaf=_is_spec)
    if p_def.num_leaves != s_def.num_leaves or not all(_is_spec(s) for s in s_flat):
        raise ValueError(
            f"param_specs must hold one PartitionSpec per parameter ({p_def.num_leaves} "
            f"parameters, got {s_def.num_leaves} leaves); pass infer_param_specs(...)'s result"
        )
    by_path = {
        path_keys(kp): (np.shape(leaf), spec)
        for (kp, leaf), spec in zip(p_flat, s_flat, strict=True)
    }
    longest = max(len(k) for k in by_path)
    o_flat, o_def = jax.tree_util.tree_flatten_with_path(opt_state)
    specs = []
    for kp, leaf in o_flat:
        keys = path_keys(kp)
        spec = PartitionSpec()
        for n in range(min(len(keys), longest), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None:
                if hit[0] == np.shape(leaf):
                    spec = hit[1]
                break
        specs.append(spec)
    return jax.tree_util.tree_unflatten(o_def, specs)
