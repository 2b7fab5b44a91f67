"""LoRA: train low-rank adapters of a frozen base, and exchange them with Hugging Face PEFT.

- :class:`LoRAConfig`: rank, alpha, dropout and the target weights (a regex over parameter
  paths); ``js.Trainer(..., lora=LoRAConfig(...))`` then trains only the adapters.
- :func:`merge` ``(base, adapters, scale)``: the params with ``W + scale * A @ B`` in place of
  each adapted weight (what the Trainer runs; also the full-model export).
- :func:`find_targets`, :func:`init_adapters`, :func:`adapter_specs`: what the Trainer uses
  to create the adapters and shard them like their base weights.
- :func:`save_peft` / :func:`load_peft`: ``adapter_config.json`` + ``adapter_model.safetensors``
  that ``peft`` loads, for the Hugging Face model families of :mod:`jaxstack.hf`.

docs/lora.md explains the design (a params transform rather than module surgery) and the
train -> export path.
"""

from jaxstack.lora.adapters import (
    Target,
    adapter_specs,
    base_reference,
    check_base,
    find_targets,
    init_adapters,
    merge,
)
from jaxstack.lora.config import DEFAULT_TARGETS, LoRAConfig
from jaxstack.lora.peft import load_peft, save_peft

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "Target",
    "adapter_specs",
    "base_reference",
    "check_base",
    "find_targets",
    "init_adapters",
    "load_peft",
    "merge",
    "save_peft",
]
