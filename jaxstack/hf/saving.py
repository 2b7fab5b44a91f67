"""Write jaxstack parameters as a Hugging Face directory, and convert checkpoints both ways.

``save`` streams one tensor at a time: the layout change and dtype cast run on the devices,
then the tensor is gathered to the host and appended to its safetensors file. In a
multi-process run every process takes part in the gathers and process 0 writes.
"""

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxstack.checkpoint import CheckpointManager, load_params
from jaxstack.hf.families import (
    abstract_params,
    family_for_config,
    family_for_hf,
    read_hf_config,
)
from jaxstack.hf.layout import jax_to_hf
from jaxstack.hf.loading import ParamSpecs, load, param_shardings
from jaxstack.hf.safetensors_io import write_safetensors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)
"""Files copied beside the weights from a tokenizer directory."""

HF_SUBDIR = "hf"
"""Folder of a converted work dir holding the HF config.json and tokenizer files."""


def save(
    out_dir: str | os.PathLike,
    config: Any,
    params: Any,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    max_shard_bytes: int = 4 * 2**30,
) -> Path:
    """Write ``params`` of ``config``'s model as a Hugging Face directory ``transformers`` loads.

    Writes ``config.json`` and ``model.safetensors`` (or numbered shards of at most
    ``max_shard_bytes`` plus ``model.safetensors.index.json``), and copies the tokenizer files
    found in ``tokenizer_dir``. ``params`` is the ``params`` collection (or ``{"params": ...}``),
    sharded or not. Tensors are stored in ``dtype`` (default: the params' dtype when they all
    share one, else float32). Returns ``out_dir``.

    Raises:
        ValueError: the params do not match the config's model, or the tokenizer directory
            holds no tokenizer files.
        TypeError: the config's family has no Hugging Face mapping.
    """
    family = family_for_config(config)
    params = params["params"] if set(params) == {"params"} else params
    flat = traverse_util.flatten_dict(params)
    _check_params(flat, abstract_params(family, config))
    if dtype is None:
        dtypes = {jnp.dtype(x.dtype) for x in flat.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else jnp.float32
    dtype = jnp.dtype(dtype)
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_config = family.config_to_hf(config, dtype.name)
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for path in tokenizer_files:
            shutil.copyfile(path, out_dir / path.name)
    sources = {}
    for entry in family.tensors(config):
        for key, index in entry.names():
            sources[key] = (flat[entry.path], index, entry.hf_shape, entry.in_axes)

    def fetch(key: str) -> np.ndarray:
        x, index, hf_shape, in_axes = sources[key]
        return _to_host(_to_hf(x, index, hf_shape=hf_shape, in_axes=in_axes, dtype=dtype))

    tensors = [(key, source[2], dtype) for key, source in sources.items()]
    write_safetensors(out_dir, tensors, fetch, max_shard_bytes=max_shard_bytes, write=writer)
    return out_dir


def convert_to_checkpoint(
    hf_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    param_specs: ParamSpecs | None = None,
    param_dtype: Any = None,
    step: int = 0,
) -> Any:
    """Convert a Hugging Face directory into a jaxstack checkpoint; returns the config.

    Writes ``<work_dir>/checkpoints/<step>/state`` holding ``{"params": ...}`` (read it with
    ``jaxstack.checkpoint.load_params``) and ``<work_dir>/hf/`` with the HF ``config.json``
    and tokenizer files, so that ``convert_to_hf(work_dir, ...)`` needs no further input.
    To fine-tune, start a ``Trainer`` from ``jaxstack.hf.load`` instead: this checkpoint has
    no optimizer state.
    """
    _, config, params = load(hf_dir, mesh=mesh, param_specs=param_specs, param_dtype=param_dtype)
    work_dir = Path(work_dir)
    manager = CheckpointManager(work_dir / "checkpoints", save_every=1, keep=1)
    manager.save(step, {"params": params}, {}, force=True)
    manager.close()
    if jax.process_index() == 0:
        hf_subdir = work_dir / HF_SUBDIR
        hf_subdir.mkdir(parents=True, exist_ok=True)
        hf_config = family_for_config(config).config_to_hf(config, "float32")
        (hf_subdir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for path in _tokenizer_files(hf_dir, required=False):
            shutil.copyfile(path, hf_subdir / path.name)
    return config


def convert_to_hf(
    work_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Any = None,
    *,
    step: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
    param_specs: ParamSpecs | None = None,
) -> Path:
    """Export the params of a jaxstack run's checkpoint as a Hugging Face directory.

    ``config`` defaults to ``<work_dir>/hf/config.json`` (written by ``convert_to_checkpoint``)
    and ``tokenizer_dir`` to ``<work_dir>/hf`` when it holds tokenizer files. ``step`` defaults
    to the latest. The params are restored onto ``mesh`` with ``param_specs`` (default: the
    first device). Returns ``out_dir``.

    Raises:
        FileNotFoundError: no checkpoint in ``work_dir``, or no config given or stored.
    """
    hf_subdir = Path(work_dir) / HF_SUBDIR
    if config is None:
        if not (hf_subdir / "config.json").is_file():
            raise FileNotFoundError(
                f"no config given and {hf_subdir / 'config.json'} does not exist; pass the "
                "model config (e.g. jaxstack.hf.config_from_hf of the original config.json)"
            )
        hf_config = read_hf_config(hf_subdir)
        config = family_for_hf(hf_config).config_from_hf(hf_config)
    if tokenizer_dir is None and _tokenizer_files(hf_subdir, required=False):
        tokenizer_dir = hf_subdir
    target = None
    if mesh is not None:
        abstract = abstract_params(family_for_config(config), config)
        shardings = param_shardings(abstract, mesh, param_specs)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    params = load_params(work_dir, target=target, step=step)
    return save(out_dir, config, params, tokenizer_dir=tokenizer_dir, dtype=dtype)


def _check_params(flat: dict, abstract: dict) -> None:
    expected = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
    got = {path: tuple(x.shape) for path, x in flat.items()}
    if got != expected:
        missing = sorted("/".join(p) for p in expected.keys() - got.keys())
        unknown = sorted("/".join(p) for p in got.keys() - expected.keys())
        wrong = sorted(
            f"{'/'.join(p)}: {list(got[p])} != {list(expected[p])}"
            for p in expected.keys() & got.keys()
            if got[p] != expected[p]
        )
        raise ValueError(
            "params do not match the config's model: "
            f"missing {missing[:5]}, unexpected {unknown[:5]}, wrong shapes {wrong[:5]}; "
            "pass the config the params were trained with"
        )


def _tokenizer_files(directory: str | os.PathLike | None, required: bool = True) -> list[Path]:
    if directory is None:
        return []
    files = [Path(directory) / name for name in TOKENIZER_FILES]
    files = [path for path in files if path.is_file()]
    if required and not files:
        raise ValueError(
            f"tokenizer_dir={str(directory)!r} holds none of {list(TOKENIZER_FILES)}; point it "
            "to the Hugging Face directory the model came from, or leave it out"
        )
    return files


@partial(jax.jit, static_argnames=("hf_shape", "in_axes", "dtype"))
def _to_hf(x: jax.Array, index, *, hf_shape, in_axes: int, dtype) -> jax.Array:
    """One HF tensor from a parameter, or from a stacked one (layers, experts) at ``index``
    into its leading axes, on the devices."""
    for i in index:
        x = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
    return jax_to_hf(x, hf_shape, in_axes).astype(dtype)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
