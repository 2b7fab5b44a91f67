"""Hugging Face interop: load a local HF directory sharded, and write one back.

- :func:`load` ``(hf_dir, *, mesh, param_specs, param_dtype, **overrides)`` ->
  ``(model, config, params)``, streaming each tensor into its sharded placement;
  :func:`load_config` + :func:`read_params` are its two halves (config first, to derive the
  placement from the model before any weight is read).
- :func:`save` ``(out_dir, config, params, *, tokenizer_dir, dtype)``: ``config.json`` +
  safetensors that ``transformers`` loads.
- :func:`convert_to_checkpoint` / :func:`convert_to_hf`: HF directory <-> jaxstack checkpoint.
- :func:`generate_text`: the ``jaxstack generate --hf DIR`` command.
- :func:`config_from_hf` / :func:`config_to_hf`: ``config.json`` dict <-> model config.

Supported model types are the keys of :data:`FAMILIES` (Llama 2/3, Mistral, Qwen2, Qwen3;
the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE); each family's key map lives beside
its model (``jaxstack/models/llama.py``, ``jaxstack/models/mixtral.py``).
"""

from typing import Any

from jaxstack.hf.commands import generate_text
from jaxstack.hf.families import (
    FAMILIES,
    eos_ids,
    family_for_config,
    family_for_hf,
    read_eos_ids,
    read_hf_config,
)
from jaxstack.hf.loading import load, load_config, read_params
from jaxstack.hf.saving import convert_to_checkpoint, convert_to_hf, save


def config_from_hf(hf_config: dict) -> Any:
    """The jaxstack model config of a Hugging Face ``config.json`` dict (any supported family).

    Raises:
        ValueError: unsupported model type or architecture feature.
    """
    return family_for_hf(hf_config).config_from_hf(hf_config)


def config_to_hf(config: Any, dtype: str = "float32") -> dict:
    """The Hugging Face ``config.json`` dict of a jaxstack model config (tensors in ``dtype``)."""
    return family_for_config(config).config_to_hf(config, dtype)


__all__ = [
    "FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "convert_to_checkpoint",
    "convert_to_hf",
    "eos_ids",
    "generate_text",
    "load",
    "load_config",
    "read_eos_ids",
    "read_hf_config",
    "read_params",
    "save",
]
