"""Model families that round-trip with Hugging Face: one registry line per family.

A family module (``jaxstack/models/<family>.py``) provides its config dataclass, its module,
``config_from_hf``, ``config_to_hf``, ``hf_tensors`` (the key map: ``HFTensor`` entries) and
``hf_ignored_tensor``; the generic streaming load/save in ``jaxstack.hf`` does the rest.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxstack.models import llama, mixtral
from jaxstack.models.llama import HFTensor


class HFFamily(NamedTuple):
    """The hooks of one model family (see the module docstring)."""

    config_type: type
    model: Callable[[Any], nn.Module]
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any, str], dict]
    tensors: Callable[[Any], list[HFTensor]]
    ignored_tensor: Callable[[Any, str], bool]


LLAMA = HFFamily(
    llama.LlamaConfig,
    llama.Llama,
    llama.config_from_hf,
    llama.config_to_hf,
    llama.hf_tensors,
    llama.hf_ignored_tensor,
)

MIXTRAL = HFFamily(
    mixtral.MixtralConfig,
    mixtral.Mixtral,
    mixtral.config_from_hf,
    mixtral.config_to_hf,
    mixtral.hf_tensors,
    llama.hf_ignored_tensor,
)

FAMILIES: dict[str, HFFamily] = {
    **{model_type: LLAMA for model_type in llama.HF_ARCHITECTURES},
    **{model_type: MIXTRAL for model_type in mixtral.HF_ARCHITECTURES},
}
"""HF ``model_type`` -> family."""


def eos_ids(value: Any) -> list[int]:
    """An ``eos_token_id`` entry of a Hugging Face config (an int, a list of ints or absent)
    as a list."""
    if isinstance(value, int):
        return [value]
    return [i for i in value if isinstance(i, int)] if isinstance(value, list) else []


def read_eos_ids(directory: str | os.PathLike) -> list[int]:
    """The end-of-sequence ids a Hugging Face model directory names, in order and without
    repeats: ``eos_token_id`` of ``generation_config.json``, then of ``config.json``, each an
    int or a list (Llama 3 lists its end-of-text and end-of-turn ids there)."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        path = Path(directory) / name
        if path.is_file():
            ids += eos_ids(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
    return list(dict.fromkeys(ids))


def read_hf_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory.

    Raises:
        FileNotFoundError: the directory or its config.json does not exist.
        ValueError: config.json is not a JSON object.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass a local Hugging Face model directory (config.json, "
            "*.safetensors, tokenizer.json)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def family_for_hf(hf_config: dict) -> HFFamily:
    """The family of an HF config, by its ``model_type``.

    Raises:
        ValueError: no family handles that model type.
    """
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        architectures = hf_config.get("architectures")
        raise ValueError(
            f"unsupported Hugging Face model_type {model_type!r} (architectures={architectures}); "
            f"jaxstack loads: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def family_for_config(config: Any) -> HFFamily:
    """The family whose config dataclass ``config`` is.

    Raises:
        TypeError: no family uses that config type.
    """
    for family in FAMILIES.values():
        if type(config) is family.config_type:
            return family
    types = sorted({family.config_type.__name__ for family in FAMILIES.values()})
    raise TypeError(f"no Hugging Face mapping for {type(config).__name__}; supported: {types}")


def abstract_params(family: HFFamily, config: Any) -> dict:
    """The model's ``params`` collection as ``ShapeDtypeStruct``s (nothing allocated)."""
    model = family.model(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
