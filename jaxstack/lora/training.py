"""What the Trainer needs to train adapters: the wrapped user functions, the memory plan,
and the reference to the base saved beside the adapters (``<work_dir>/lora.json``).

The Trainer's state holds the adapters as its ``params`` (so the optimizer state, the
gradients and the checkpoints hold adapters only); the base is a separate, never-donated
input of the jitted step, merged with the adapters inside it (``adapters.merge``).
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxstack.lora.adapters import (
    LORA_A,
    LORA_B,
    Target,
    adapter_pairs,
    base_reference,
    check_base,
    merge,
)
from jaxstack.lora.config import LoRAConfig
from sharding_rules import MemoryPlan

Params = Any
REFERENCE_FILE = "lora.json"
_DROPOUT_SALT = 0x10AA


def lora_loss(loss_fn: Callable, config: LoRAConfig, *, train: bool) -> Callable:
    """``(adapters, batch, rng, base) -> loss_fn(merged params, batch, rng)``; adapter dropout
    only with ``train``."""

    def fn(adapters, batch, rng, base):
        dropout = config.dropout if train else 0.0
        rng_dropout = jax.random.fold_in(rng, _DROPOUT_SALT) if dropout else None
        params = merge(base, adapters, config.scale, dropout=dropout, rng=rng_dropout)
        return loss_fn(params, batch, rng)

    return fn


def lora_pred(pred_fn: Callable, config: LoRAConfig) -> Callable:
    """``pred_fn`` over ``{"base": ..., "adapters": ...}`` (merged, no dropout)."""

    def fn(params, batch, rng):
        return pred_fn(merge(params["base"], params["adapters"], config.scale), batch, rng)

    return fn


def combined_plan(base: MemoryPlan, adapters: MemoryPlan) -> MemoryPlan:
    """The memory of LoRA training: the frozen base's weights (no gradient, no optimizer
    state) plus the adapters' weights, gradients and optimizer state."""
    return dataclasses.replace(
        adapters,
        entries=base.entries + adapters.entries,
        param_bytes=base.param_bytes + adapters.param_bytes,
    )


def adapter_reasons(adapters: Params) -> dict[str, str]:
    """Why each adapter is sharded as it is, for the plan table."""
    reasons = {}
    for path in adapter_pairs(adapters):
        reasons[f"{path}/{LORA_A}"] = f"LoRA A of {path}: its layer/expert and input dims"
        reasons[f"{path}/{LORA_B}"] = f"LoRA B of {path}: its layer/expert and output dims"
    return reasons


def write_reference(
    work_dir: str | Path, config: LoRAConfig, targets: list[Target], base: Params
) -> None:
    """Record the LoRA settings, the adapted weights and a fingerprint of ``base`` in
    ``work_dir/lora.json`` (process 0), or check ``base`` against the one already there.

    Raises:
        ValueError: the work dir's adapters were trained on another base (one line).
    """
    path = Path(work_dir) / REFERENCE_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        check_base(saved["base"], base, f"the adapters in {work_dir}")
        return
    reference = base_reference(base)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "config": dataclasses.asdict(config),
            "targets": [dataclasses.asdict(t) for t in targets],
            "base": reference,
        }
        path.write_text(json.dumps(record, indent=1))
