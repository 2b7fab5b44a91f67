"""Expert parallelism: the dispatch per device inside ``shard_map``.

Tokens stay split over the batch axes (``data``, ``fsdp``, ``expert``: outside these layers
the ``expert`` axis is data-parallel) and ``sequence``; expert weights come in split over
``expert`` (and their width over ``tensor``, whose partial sums are added with a ``psum``).
With ``expert > 1`` each rank sorts its tokens' assignments by expert, sends each expert's
rows to the rank that owns it and gets the results back with ``ragged_all_to_all``.
XLA:CPU has no ragged all-to-all, so there (``exchange="padded"``, what ``"auto"`` picks on
CPU) the same exchange is a padded ``all_to_all`` plus a scatter, with identical semantics.
A batch too small to split over the batch axes (decoding one sequence) is replicated:
every rank then routes all of it, which gives the same output. Without a mesh the layer
runs the plain dropless path (``dispatch.routed_experts``).
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxstack.layers.moe.dispatch import (
    combine,
    expert_capacity,
    expert_mlp,
    routed_experts,
    sort_by_expert,
)
from sharding_rules import fitting_spec, uses_our_axes

EXCHANGES = ("auto", "ragged", "padded")


def padded_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
    max_send: int,
) -> jax.Array:
    """``lax.ragged_all_to_all``'s semantics from a padded ``all_to_all`` (XLA:CPU has no
    ragged one): the slices for each destination are packed into ``max_send`` rows (at least
    the most any destination receives from this device), sent together with the row each
    lands on, and scattered into ``output``. ``recv_sizes`` is implied by what arrives."""
    del recv_sizes
    ranks = jax.lax.axis_size(axis_name)
    per_rank = send_sizes.shape[0] // ranks
    sizes = send_sizes.reshape(ranks, per_rank)
    ends = jnp.cumsum(sizes, axis=1)
    starts = ends - sizes
    position = jnp.arange(max_send, dtype=jnp.int32)
    piece = jax.vmap(lambda e: jnp.searchsorted(e, position, side="right"))(ends)  # [ranks, m]
    piece = jnp.minimum(piece, per_rank - 1)
    valid = position[None, :] < ends[:, -1:]
    index = piece + per_rank * jnp.arange(ranks)[:, None]
    within = position[None, :] - jnp.take_along_axis(starts, piece, axis=1)
    source = jnp.clip(input_offsets[index] + within, 0, operand.shape[0] - 1)
    target = jnp.where(valid, output_offsets[index] + within, output.shape[0])
    rows = jnp.where(valid[..., None], operand[source], 0).astype(operand.dtype)
    rows = jax.lax.all_to_all(rows, axis_name, 0, 0)
    target = jax.lax.all_to_all(target, axis_name, 0, 0)
    return output.at[target.reshape(-1)].set(rows.reshape(-1, *operand.shape[1:]), mode="drop")


def _exchange_fn(exchange: str) -> Callable[..., jax.Array]:
    """The exchange ``exchange`` names; ``auto``: ragged where the backend and the installed
    jax have it, padded otherwise."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}; choose one of {EXCHANGES}")
    has_ragged = hasattr(jax.lax, "ragged_all_to_all")
    if exchange == "auto":
        exchange = "ragged" if has_ragged and jax.default_backend() != "cpu" else "padded"
    if exchange == "padded":
        return padded_ragged_all_to_all
    if not has_ragged:
        raise ValueError(
            f"exchange='ragged' needs jax.lax.ragged_all_to_all, which jax {jax.__version__} "
            "does not have; use exchange='padded' (or 'auto')"
        )

    def ragged(*args, axis_name: str, max_send: int) -> jax.Array:
        del max_send
        return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

    return ragged


class _Route(NamedTuple):
    """The four offset/size vectors of one ``ragged_all_to_all``."""

    input_offsets: jax.Array
    send_sizes: jax.Array
    output_offsets: jax.Array
    recv_sizes: jax.Array


def exchange_plan(
    counts: jax.Array, rank: jax.Array, local_experts: int
) -> tuple[_Route, _Route, jax.Array]:
    """Offsets of the trip to the experts and back, from ``counts: [ranks, E]`` (rows each
    rank sends to each global expert; rank ``j`` owns experts ``j*El .. (j+1)*El - 1``).

    Each rank sends its rows sorted by global expert. On the owner they land grouped by its
    local expert, senders in rank order within an expert, so the grouped matmul can run on
    the receive buffer as it is. Returns ``(there, back, local_group_sizes: [El])``.
    """
    ranks = counts.shape[0]
    exclusive = lambda a, axis: jnp.cumsum(a, axis) - a  # noqa: E731
    per_owner = counts.reshape(ranks, ranks, local_experts)  # [sender, owner, local expert]
    totals = per_owner.sum(0)  # [owner, El]
    group_start = exclusive(totals, 1)  # where each expert's rows begin on its owner
    earlier = exclusive(per_owner, 0)  # rows of lower-ranked senders before mine
    sent_from = exclusive(counts, 1).reshape(ranks, ranks, local_experts)  # in each sender
    mine, to_me = counts[rank], per_owner[:, rank]  # [E], [sender, El]
    there = _Route(
        input_offsets=sent_from[rank].reshape(-1),
        send_sizes=mine,
        output_offsets=(group_start + earlier[rank]).reshape(-1),
        recv_sizes=to_me.reshape(-1),
    )
    back = _Route(
        input_offsets=(group_start[rank][None] + earlier[:, rank]).reshape(-1),
        send_sizes=to_me.reshape(-1),
        output_offsets=sent_from[:, rank].reshape(-1),
        recv_sizes=mine,
    )
    return there, back, totals[rank]


def expert_parallel(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    axis: str,
    capacity_factor: float | None,
    exchange: str,
    tensor_axis: str | None,
) -> jax.Array:
    """The expert mixture of this device's tokens, inside ``shard_map`` over ``axis``.

    ``x: [t, d]``, ``experts, weights: [t, k]``: this device's tokens; ``w_*``: this rank's
    ``El`` experts. Sorts the assignments by expert, exchanges rows with the experts' owners
    both ways, combines and sums the ``tensor_axis`` partial sums -> ``[t, d]``. The receive
    buffer holds the worst case, every rank's ``t * k`` rows (or ``E * capacity``).
    """
    ranks = jax.lax.axis_size(axis)
    tokens, k = experts.shape
    local_experts = w_gate.shape[0]
    num_experts = local_experts * ranks
    capacity = expert_capacity(tokens, k, num_experts, capacity_factor)
    dispatch = sort_by_expert(experts.reshape(-1), num_experts, capacity)
    rows = x[dispatch.order // k]  # [t*k, d], grouped by global expert
    counts = jax.lax.all_gather(dispatch.group_sizes, axis)  # [ranks, E]
    there, back, group_sizes = exchange_plan(counts, jax.lax.axis_index(axis), local_experts)
    received = tokens * k * ranks
    if capacity is not None:
        received = min(received, capacity * num_experts)
    send = functools.partial(_exchange_fn(exchange), axis_name=axis, max_send=tokens * k)
    inbox = send(rows, jnp.zeros((received, x.shape[1]), x.dtype), *there)
    done = expert_mlp(inbox, w_gate, w_up, w_down, group_sizes)
    rows = send(done, jnp.zeros_like(rows), *back)
    out = combine(rows, dispatch, weights)
    if tensor_axis is not None:
        out = jax.lax.psum(out, tensor_axis)
    return out


def dispatch_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    capacity_factor: float | None = None,
    exchange: str = "auto",
) -> jax.Array:
    """``x: [b, s, d]``, ``experts, weights: [b, s, k]`` -> ``[b, s, d]``: the routed experts'
    mixture, per device inside ``shard_map`` on a mesh of ``MESH_AXES`` (module doc),
    ``routed_experts`` directly otherwise.

    Raises:
        ValueError: the mesh's ``expert`` axis does not divide the number of experts, or an
            unknown ``exchange``.
    """
    b, s, d = x.shape
    k = experts.shape[-1]
    num_experts, _, width = w_gate.shape
    _exchange_fn(exchange)  # an unknown exchange fails here, where it enters
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh) or mesh.size == 1:
        flat = routed_experts(
            x.reshape(b * s, d),
            experts.reshape(b * s, k),
            weights.reshape(b * s, k),
            w_gate,
            w_up,
            w_down,
            capacity_factor,
        )
        return flat.reshape(b, s, d)
    sizes = dict(mesh.shape)
    ranks, tensor = sizes.get("expert", 1), sizes.get("tensor", 1)
    if num_experts % ranks:
        fitting = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise ValueError(
            f"the mesh's expert={ranks} does not divide num_experts={num_experts}; use an "
            f"expert axis size among {fitting}"
        )
    expert_axis = "expert" if ranks > 1 else None
    tensor_axis = "tensor" if tensor > 1 and width % tensor == 0 else None
    tokens = fitting_spec(x.shape, ("batch", "seq", "embed"), sizes)
    routes = PartitionSpec(tokens[0], tokens[1], None)
    w_in = PartitionSpec(expert_axis, None, tensor_axis)
    w_out = PartitionSpec(expert_axis, tensor_axis, None)

    def local(x, experts, weights, w_gate, w_up, w_down):
        lb, ls = x.shape[:2]
        args = (
            x.reshape(lb * ls, d),
            experts.reshape(lb * ls, k),
            weights.reshape(lb * ls, k),
            w_gate,
            w_up,
            w_down,
        )
        if expert_axis is None:
            out = routed_experts(*args, capacity_factor)
            if tensor_axis is not None:
                out = jax.lax.psum(out, tensor_axis)
        else:
            out = expert_parallel(
                *args,
                axis=expert_axis,
                capacity_factor=capacity_factor,
                exchange=exchange,
                tensor_axis=tensor_axis,
            )
        return out.reshape(lb, ls, d)

    mapped = jax.shard_map(
        local,
        in_specs=(tokens, routes, routes, w_in, w_in, w_out),
        out_specs=tokens,
        check_vma=False,
    )
    return mapped(x, experts, weights, w_gate, w_up, w_down)
