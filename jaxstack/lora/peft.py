"""Adapters <-> Hugging Face PEFT (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT stores, per adapted ``nn.Linear`` (``weight: [out, in]``),
``base_model.model.<module>.lora_A.weight: [r, in]`` and ``...lora_B.weight: [out, r]``, and
runs ``W + (lora_alpha / r) * B @ A``. jaxstack's ``A: [*lead, *in, r]`` / ``B: [*lead, r,
*out]`` of a kernel ``[*lead, *in, *out]`` are the same numbers in the layout of
``jaxstack.hf.layout`` (flatten ``in`` and ``out``, transpose), one PEFT pair per stacked
layer or expert; the module names come from each family's Hugging Face key map
(``HFTensor``), so any family :mod:`jaxstack.hf` converts exchanges adapters too.
"""

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util

from jaxstack.hf.families import abstract_params, family_for_config
from jaxstack.lora.adapters import LORA_A, LORA_B, adapter_pairs
from jaxstack.lora.config import LoRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

Params = Any


def _modules(model_config: Any) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], int]]:
    """HF module name -> (jaxstack param path, index on its stacked axes, in_axes) of every
    ``nn.Linear`` of ``model_config``'s model."""
    modules = {}
    for entry in family_for_config(model_config).tensors(model_config):
        if entry.in_axes == 0:
            continue
        for key, index in entry.names():
            modules[key.removesuffix(".weight")] = (entry.path, index, entry.in_axes)
    return modules


def save_peft(
    out_dir: str | os.PathLike,
    model_config: Any,
    adapters: Params,
    lora: LoRAConfig,
    *,
    base_model: str | None = None,
) -> Path:
    """Write ``adapters`` (trained on ``model_config``'s model) as a PEFT adapter directory
    that ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` loads; ``base_model`` is
    recorded as ``base_model_name_or_path``. Returns ``out_dir``.

    Raises:
        ValueError: an adapted weight that is no Hugging Face ``nn.Linear`` of the family.
    """
    by_path = {}
    for module, (path, index, in_axes) in _modules(model_config).items():
        by_path.setdefault("/".join(path), []).append((module, index, in_axes))
    tensors, names = {}, []
    for path, (a, b) in adapter_pairs(_unwrap(adapters)).items():
        if path not in by_path:
            raise ValueError(
                f"the adapter of {path} has no Hugging Face module to go to (PEFT adapts "
                "nn.Linear weights of the family's key map); leave it out of lora.targets"
            )
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for module, index, _ in by_path[path]:
            rank = a.shape[-1]
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(
                a[index].reshape(-1, rank).T
            )
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
                b[index].reshape(rank, -1).T
            )
            names.append(module)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _target_modules(names, list(_modules(model_config))),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _target_modules(adapted: list[str], modules: list[str]) -> list[str] | str:
    """PEFT ``target_modules``: the adapted modules' last names when those select exactly the
    adapted modules, else a regex of their full names."""
    last = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if {m for m in modules if m.rsplit(".", 1)[-1] in last} == set(adapted):
        return last
    return "|".join(re.escape(name) for name in sorted(adapted))


def _unwrap(params: Params) -> Params:
    return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def load_peft(adapter_dir: str | os.PathLike, model_config: Any) -> tuple[Params, LoRAConfig]:
    """A PEFT LoRA adapter directory as ``(adapters, LoRAConfig)`` for ``model_config``'s
    model: ``merge(params, adapters, lora.scale)`` runs what PEFT runs. Stacked weights
    (scanned layers, experts) a PEFT adapter leaves out get zero adapters.

    Raises:
        FileNotFoundError: no adapter_config.json or adapter_model.safetensors.
        ValueError (one line): not a LoRA adapter, an option jaxstack does not run (bias,
            fan_in_fan_out, rank_pattern, ...), a module the base lacks, a rank other than
            ``r``, or shapes of another base model.
    """
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / name).exists():
            raise FileNotFoundError(f"{adapter_dir / name} not found: not a PEFT adapter dir")
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    lora = _lora_config(config, adapter_dir)
    weights = safetensors.numpy.load_file(str(adapter_dir / WEIGHTS_FILE))
    modules = _modules(model_config)
    shapes = traverse_util.flatten_dict(abstract_params(family_for_config(model_config),
                                                        model_config))  # fmt: skip
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key in sorted(weights):
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        if match is None:
            raise ValueError(f"{adapter_dir}: tensor {key!r} is not a PEFT LoRA weight")
        module, kind = match.groups()
        if module not in modules:
            raise ValueError(
                f"{adapter_dir} adapts {module}, which the base model lacks: it was made for "
                "another base model"
            )
        path, index, in_axes = modules[module]
        shape = shapes[path].shape
        lead = len(index)
        in_shape, out_shape = shape[lead : lead + in_axes], shape[lead + in_axes :]
        value = weights[key].astype(np.float32)
        rank = value.shape[0] if kind == "A" else value.shape[-1]
        if rank != lora.rank:
            raise ValueError(
                f"{adapter_dir}: {key} has rank {rank} but adapter_config.json says r="
                f"{lora.rank}; the adapter is inconsistent"
            )
        want = (rank, math.prod(in_shape)) if kind == "A" else (math.prod(out_shape), rank)
        if value.shape != want:
            raise ValueError(
                f"{adapter_dir}: {key} has shape {value.shape}, this base model needs {want}: "
                "it was made for another base model"
            )
        name = LORA_A if kind == "A" else LORA_B
        full = (*shape[:lead], *in_shape, rank) if kind == "A" else (*shape[:lead], rank,
                                                                      *out_shape)  # fmt: skip
        target = flat.setdefault((*path, name), np.zeros(full, np.float32))
        target[index] = value.T.reshape(full[lead:])
    for path in {key[:-1] for key in flat}:
        for name in (LORA_A, LORA_B):
            if (*path, name) not in flat:
                raise ValueError(f"{adapter_dir}: {'/'.join(path)} has no lora_{name[-1].upper()}")
    return traverse_util.unflatten_dict(flat), lora


_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "use_dora": False,
    "lora_bias": False,
}


def _lora_config(config: dict, where: Path) -> LoRAConfig:
    """The ``LoRAConfig`` of a PEFT ``adapter_config.json`` (rsLoRA's ``alpha / sqrt(r)``
    folded into ``alpha``)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where} holds a {config.get('peft_type')} adapter; only LORA loads")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key) is not None and config[key] != plain:
            raise ValueError(
                f"{where}: {key}={config[key]!r} is not supported (only {plain!r}); "
                "re-export the adapter without it"
            )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha *= math.sqrt(rank)
    targets = config.get("target_modules") or []
    if not isinstance(targets, str):
        targets = "|".join(re.escape(t) for t in targets)
    return LoRAConfig(
        rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
        targets=targets or ".",
    )  # fmt: skip
