"""Context parallelism in the model: the sequence split over the ``sequence`` mesh axis.

With ``LlamaConfig.context_parallel`` set to ``"ring"`` or ``"all_gather"`` and a mesh whose
``sequence`` axis is larger than 1, the model reorders its inputs (token ids, positions,
segment ids) once into the zig-zag layout (:mod:`pallas_kernels.collectives.layout`), so that
the ordinary split of the sequence dimension over ``sequence`` gives each device one early
and one late chunk; every per-token layer runs on its shard unchanged, attention runs
:func:`pallas_kernels.context_attention` per device, and the output is put back in natural
order. Positions (RoPE) and segment ids travel with their tokens, so they stay global.
Outside such a mesh (one device, a decode step, ``sequence`` = 1) nothing changes.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec

from pallas_kernels.collectives import check_layout, context_attention, from_layout, to_layout
from sharding_rules import fitting_spec, uses_our_axes

CONTEXT_PARALLEL = ("none", "ring", "all_gather")
LAYOUT = "zigzag"


def sequence_shards() -> int:
    """Size of the ``sequence`` axis of the current mesh (1 outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape).get("sequence", 1) if uses_our_axes(mesh) else 1


def active(strategy: str) -> bool:
    """Whether context parallelism applies here: an option set, and sequence shards."""
    return strategy != "none" and sequence_shards() > 1


def to_shards(x: jax.Array | None, seq_len_of: str = "the batch") -> jax.Array | None:
    """``[b, s, ...]`` in natural order -> the zig-zag order the sequence split expects.

    Raises:
      ValueError: ``s`` is not a multiple of 2 x ``sequence``; the message names lengths
        that work.
    """
    if x is None:
        return None
    n = sequence_shards()
    try:
        check_layout(LAYOUT, x.shape[1], n)
    except ValueError as error:
        raise ValueError(f"context parallelism over {seq_len_of}: {error}") from None
    return to_layout(x, LAYOUT, n)


def from_shards(x: jax.Array) -> jax.Array:
    """Inverse of :func:`to_shards`."""
    return from_layout(x, LAYOUT, sequence_shards())


def model_order(strategy: str, *per_token: jax.Array) -> tuple[jax.Array, ...]:
    """``per_token`` arrays ``[b, s, ...]`` (a loss's targets and weights) in the order a model
    with ``context_parallel=strategy`` returns its output under ``natural_order=False``: the
    zig-zag order where context parallelism applies, unchanged elsewhere. Permuting these is
    what spares the model's gather of its ``[b, s, hidden]`` output."""
    if not active(strategy):
        return per_token
    return tuple(to_shards(x, "the targets") for x in per_token)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    strategy: str,
    sliding_window: int | None,
    implementation: str = "auto",
) -> jax.Array:
    """Causal attention of zig-zag-ordered ``[b, s, h, d]`` q/k/v with the sequence split
    over ``sequence`` (batch over the batch axes, heads over ``tensor`` when every head
    count divides it), each device running ``context_attention``.

    ``implementation`` (the model's ``attention_impl``) picks the per-block compute:
    ``"xla"`` the jnp block, ``"pallas"`` the backend's flash kernel, ``"auto"`` and
    ``"cudnn"`` (which exposes no log-sum-exp to merge) the flash kernel on GPU/TPU unless a
    sliding window is set (``pallas_kernels.collectives.attention.block_kernel``)."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    tensor = sizes.get("tensor", 1)
    heads = "heads" if q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    q_spec, kv_spec = (fitting_spec(x.shape, ("batch", "seq", heads, None), sizes) for x in (q, k))
    fn = functools.partial(
        context_attention, axis_name="sequence", strategy=strategy, layout=LAYOUT,
        causal=True, sliding_window=sliding_window,
        block_impl="auto" if implementation == "cudnn" else implementation,
    )  # fmt: skip
    args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(PartitionSpec(*q_spec[:2]))
    mapped = jax.shard_map(fn, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)
    return mapped(*args)
