"""Stream a Hugging Face directory into sharded jaxstack parameters.

Each tensor is read from its safetensors file into one fresh host buffer, viewed in the
jaxstack layout (reshape/transpose views, no copy), and placed with
``jax.make_array_from_callback`` so that every device receives only its own shard; dtype
conversion then runs on the devices. The host buffer is dropped before the next tensor, so
host memory beyond the placed model stays near the size of the largest tensor. Stacked
parameters (scanned layers, experts) are filled one HF tensor at a time into a preallocated
sharded array.
"""

import dataclasses
import os
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jaxstack.hf.families import (
    HFFamily,
    abstract_params,
    family_for_config,
    family_for_hf,
    read_hf_config,
)
from jaxstack.hf.layout import hf_to_jax
from jaxstack.hf.safetensors_io import SafetensorsReader
from jaxstack.models.llama import HFTensor

Params = Any
ParamSpecs = Any | Callable[[Params, Mesh], Any]
"""A pytree of ``PartitionSpec`` matching the params, or ``fn(abstract_params, mesh)`` -> one."""


def load(
    hf_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    param_specs: ParamSpecs | None = None,
    param_dtype: Any = None,
    **config_overrides,
) -> tuple[nn.Module, Any, Params]:
    """Load a local Hugging Face model directory as ``(model, config, params)``.

    ``params`` is the model's ``params`` collection (``model.apply({"params": params}, ids)``),
    placed with ``param_specs`` on ``mesh`` (default: replicated over the mesh; without a mesh,
    on the first device) in ``param_dtype`` (default float32, the model's convention; the
    compute dtype is the ``dtype`` config override, e.g. ``dtype="bfloat16"``).
    ``config_overrides`` replace config fields (``scan_layers=True``, ``max_seq_len=...``).

    Raises:
        FileNotFoundError: no config.json or safetensors weights in ``hf_dir``.
        ValueError: unsupported architecture; a tensor with the wrong shape; tensors the model
            has no parameter for; a corrupt file; specs that do not fit the params or mesh.
        KeyError: a tensor the model needs is missing.
        TypeError: an unknown config override.
    """
    config = load_config(hf_dir, **config_overrides)
    params = read_params(
        hf_dir, config, mesh=mesh, param_specs=param_specs, param_dtype=param_dtype
    )
    return family_for_config(config).model(config), config, params


def load_config(hf_dir: str | os.PathLike, **config_overrides) -> Any:
    """The model config ``load`` builds for ``hf_dir`` (``config.json`` with
    ``config_overrides``, the head untied where the files hold a distinct one), read without
    loading any weight: build the model from it, derive placements, then ``read_params``.

    Raises:
        FileNotFoundError, ValueError, TypeError: as ``load``.
    """
    hf_config = read_hf_config(hf_dir)
    family = family_for_hf(hf_config)
    config = _with_overrides(family.config_from_hf(hf_config), config_overrides)
    return _untie_distinct_head(hf_dir, family, config)


def read_params(
    hf_dir: str | os.PathLike,
    config: Any,
    *,
    mesh: Mesh | None = None,
    param_specs: ParamSpecs | None = None,
    param_dtype: Any = None,
) -> Params:
    """The params of ``config``'s model, streamed from ``hf_dir``'s safetensors (see ``load``)."""
    family = family_for_config(config)
    abstract = abstract_params(family, config)
    shardings = traverse_util.flatten_dict(param_shardings(abstract, mesh, param_specs))
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
    reader = SafetensorsReader(hf_dir)
    entries = _check_tensors(reader, family, config, set(shapes))
    dtype = jnp.dtype(param_dtype or jnp.float32)
    flat = {}
    for entry in entries:
        shape, sharding = shapes[entry.path], shardings[entry.path]
        if isinstance(entry.key, str):
            flat[entry.path] = _place(reader, entry.key, entry, shape, sharding, dtype)
        else:
            flat[entry.path] = _place_stacked(reader, entry, shape, sharding, dtype)
    return traverse_util.unflatten_dict(flat)


def _untie_distinct_head(hf_dir: str | os.PathLike, family: HFFamily, config: Any) -> Any:
    """``config`` untied when it says the head is the embedding but the files hold an output
    head with other values: ``transformers`` then uses that head (with a warning), so
    dropping it would silently give other logits."""
    if not getattr(config, "tie_embeddings", False):
        return config
    untied = dataclasses.replace(config, tie_embeddings=False)
    keys = {entry.path: entry.key for entry in family.tensors(untied)}
    head, embedding = keys.get(("lm_head", "kernel")), keys.get(("embed", "embedding"))
    reader = SafetensorsReader(hf_dir)
    stored = reader.keys()
    if head not in stored or np.array_equal(reader.read(head), reader.read(embedding)):
        return config
    warnings.warn(
        f"{hf_dir}: config.json ties the output head to the embedding "
        f"(tie_word_embeddings=true) but the files hold a different {head!r}; loading the "
        "head untied, as transformers does. Set tie_word_embeddings=false to silence this.",
        stacklevel=3,
    )
    return untied


def _with_overrides(config: Any, overrides: dict) -> Any:
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown config overrides {unknown}; valid keys: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def param_shardings(abstract: Params, mesh: Mesh | None, param_specs: ParamSpecs | None) -> Params:
    """The sharding of every parameter: ``param_specs`` on ``mesh`` (see ``load``)."""
    if mesh is None:
        if param_specs is not None:
            raise ValueError(
                "param_specs needs a mesh; pass mesh=jaxstack.mesh.make_mesh(...) as well"
            )
        device = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, abstract)
    specs = param_specs(abstract, mesh) if callable(param_specs) else param_specs
    if specs is None:
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), abstract)
    try:
        return jax.tree.map(lambda _, spec: NamedSharding(mesh, spec), abstract, specs)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            "param_specs must be a pytree of PartitionSpec with the params' structure "
            f"(keys {sorted(abstract)} at the top) or a function (abstract_params, mesh) -> "
            f"such a pytree: {exc}"
        ) from exc


def _check_tensors(
    reader: SafetensorsReader, family: HFFamily, config: Any, paths: set[tuple[str, ...]]
) -> list[HFTensor]:
    """The family's key map, checked against the model and the files before reading any data."""
    entries = family.tensors(config)
    mapped = {entry.path for entry in entries}
    if mapped != paths:
        raise RuntimeError(
            f"the {type(config).__name__} Hugging Face key map does not match the model's "
            f"parameters (unmapped: {sorted(paths - mapped)}, unknown: {sorted(mapped - paths)})"
        )
    used = set()
    for entry in entries:
        for key, _ in entry.names():
            used.add(key)
            shape = reader.info(key).shape
            if shape != entry.hf_shape:
                raise ValueError(
                    f"tensor {key!r} in {reader.info(key).file} has shape {list(shape)}, but "
                    f"config.json implies {list(entry.hf_shape)}; config.json does not match "
                    "the weights"
                )
    unexpected = sorted(k for k in reader.keys() - used if not family.ignored_tensor(config, k))
    if unexpected:
        raise ValueError(
            f"{reader.directory} holds {len(unexpected)} tensors the model has no parameter "
            f"for, e.g. {unexpected[:5]}; config.json does not describe these weights"
        )
    return entries


def _place(
    reader: SafetensorsReader,
    key: str,
    entry: HFTensor,
    shape: tuple[int, ...],
    sharding: Sharding,
    dtype: jnp.dtype,
) -> jax.Array:
    # the host tensor lives only inside this expression, not during the dtype conversion
    array = _put(hf_to_jax(reader.read(key), shape, entry.in_axes), sharding, key, entry.path)
    return array if array.dtype == dtype else _astype(array, dtype)


def _put(host, sharding: Sharding, key: str, path: tuple[str, ...]) -> jax.Array:
    """Each device gets its shard of the host array (a view: no host copy)."""
    try:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    except ValueError as exc:
        raise ValueError(
            f"cannot place {key!r} as {'/'.join(path)} {list(host.shape)} with {sharding}: "
            f"{exc}; fix param_specs for this parameter"
        ) from exc


def _place_stacked(
    reader: SafetensorsReader,
    entry: HFTensor,
    shape: tuple[int, ...],
    sharding: Sharding,
    dtype: jnp.dtype,
) -> jax.Array:
    stacked = jax.jit(partial(jnp.zeros, shape, dtype), out_shardings=sharding)()
    for key, index in entry.names():
        piece_sharding = sharding  # the stacked axes' sharding dropped
        if isinstance(sharding, NamedSharding):
            spec = PartitionSpec(*sharding.spec[len(index) :])
            piece_sharding = NamedSharding(sharding.mesh, spec)
        piece = _place(reader, key, entry, shape[len(index) :], piece_sharding, dtype)
        stacked = _set_index(stacked, piece, index, sharding=sharding)
    return stacked


@partial(jax.jit, static_argnames="dtype")
def _astype(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return x.astype(dtype)


@partial(jax.jit, donate_argnums=0, static_argnames="sharding")
def _set_index(stacked: jax.Array, value: jax.Array, index, *, sharding: Sharding) -> jax.Array:
    """``stacked[index] = value`` for an ``index`` into its leading axes."""
    starts = (*index, *[0] * value.ndim)
    updated = jax.lax.dynamic_update_slice(stacked, value[(None,) * len(index)], starts)
    return jax.lax.with_sharding_constraint(updated, sharding)
