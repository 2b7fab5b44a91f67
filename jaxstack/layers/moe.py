"""Mixture-of-experts feed-forward: router, dropless dispatch, expert-parallel exchange.

``MoE``: x ``[b, s, d]`` -> ``[b, s, d]``, with ``E`` experts of width ``f``, ``k`` per token::

    logits  = x @ router                        [t, E]  float32
    scores  = softmax(logits) or sigmoid(logits)
    experts = top_k(scores + bias, k)           [t, k]  bias: selection only (see below)
    weights = scores[experts]  (/ their sum when renormalised) * routed_scaling_factor
    y       = sum_k weights * SwiGLU_expert(x)  (+ shared expert, optionally sigmoid-gated)

**Dispatch.** The ``t * k`` (token, expert) assignments are sorted by expert, the tokens are
gathered in that order (``[t*k, d]``), the experts run as grouped matmuls over the dynamic
group sizes (``grouped_matmul``: ``pallas_kernels.moe.gmm``, the one call site), and the
rows go back to assignment order and are summed with their routing weights. Nothing is dropped by
default; with ``capacity_factor`` an expert takes at most ``C = ceil(cf * t * k / E)`` of a
group's assignments (earliest tokens first) and the rest contribute nothing (a token that
loses all its experts passes through the block on the residual alone).

**Expert parallelism.** On a mesh the dispatch runs per device inside ``shard_map``: tokens
stay split over the batch axes (``data``, ``fsdp``, ``expert``: outside these layers the
``expert`` axis is data-parallel) and ``sequence``; expert weights come in split over
``expert`` (and their width over ``tensor``, whose partial sums are added with a ``psum``).
With ``expert > 1`` each rank sorts its tokens' assignments by expert, sends each expert's
rows to the rank that owns it and gets the results back with ``ragged_all_to_all``.
XLA:CPU has no ragged all-to-all, so there (``exchange="padded"``, what ``"auto"`` picks on
CPU) the same exchange is a padded ``all_to_all`` plus a scatter, with identical semantics.
A batch too small to split over the batch axes (decoding one sequence) is replicated:
every rank then routes all of it, which gives the same output. Without a mesh the layer
runs the plain dropless path.

**Losses, sown into the ``MOE_COLLECTION`` collection** (``moe_summary`` collects them):
``aux_loss = E * sum_i f_i * P_i`` (``f_i`` the fraction of assignments routed to expert
``i``, ``P_i`` its mean routing probability; 1.0 when balanced), ``z_loss =
mean(logsumexp(logits)**2)`` (ST-MoE), ``load = f`` and ``loss``, their weighted sum.

**Auxiliary-loss-free balancing** (DeepSeek-V3): a per-expert ``score_bias`` is added to the
scores for the top-k choice only. It is a parameter that no loss moves: its "gradient" is
defined by ``balance_probe`` (a zero-valued term of ``loss``) as ``load - 1/E`` (scaled by
``BIAS_PROBE_SCALE`` so that it is invisible in the gradient norm), and
``route_router_bias`` hands it to ``b -= rate * sign(gradient)`` instead of the LM
optimizer: overloaded experts become less attractive, underloaded ones more.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from jaxstack.layers.dense import dense_dot_general
from jaxstack.layers.mlp import SwiGLU
from pallas_kernels.moe import gmm
from sharding_rules import fitting_spec, uses_our_axes
from sharding_rules.paths import path_keys

MOE_COLLECTION = "moe"
"""The Flax collection the MoE layers sow their losses and load into."""
ROUTER_BIAS = "score_bias"
"""Name of the aux-loss-free balancing bias parameter (``route_router_bias`` finds it)."""
SCORE_FUNCTIONS = ("softmax", "sigmoid")
EXCHANGES = ("auto", "ragged", "padded")
BIAS_PROBE_SCALE = 1e-6
"""The balancing bias's pseudo-gradient is ``BIAS_PROBE_SCALE * (load - 1/E)``; its sign is
what moves the bias, so the scale only keeps it out of the gradient norm and clipping."""


# -- router ---------------------------------------------------------------------------------
class Routing(NamedTuple):
    """What the router decided for ``t`` tokens; float fields are float32."""

    experts: jax.Array
    """``[..., k]`` int32: each token's experts, best first."""
    weights: jax.Array
    """``[..., k]``: each chosen expert's weight in the token's output."""
    load: jax.Array
    """``[E]``: the fraction of the ``t * k`` assignments each expert got (sums to 1)."""
    aux_loss: jax.Array
    """``[]``: ``E * sum(load * mean routing probability)``; 1.0 when balanced."""
    z_loss: jax.Array
    """``[]``: ``mean(logsumexp(logits) ** 2)``."""


def route(
    logits: jax.Array,
    k: int,
    *,
    score_fn: str = "softmax",
    normalize: bool = True,
    scale: float = 1.0,
    bias: jax.Array | None = None,
) -> Routing:
    """Top-``k`` routing of ``logits: [..., E]`` (module doc).

    ``score_fn``: ``softmax`` (Mixtral, Qwen-MoE) or ``sigmoid`` (DeepSeek-V3). ``normalize``
    divides the k weights by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3; not Qwen2-MoE).
    ``bias: [E]`` shifts the scores for the choice of experts only; it gets no gradient
    here. For sigmoid scores the aux loss's probabilities are the scores normalised per token.

    Raises:
        ValueError: an unknown ``score_fn`` or ``k`` outside ``[1, E]``.
    """
    num_experts = logits.shape[-1]
    if score_fn not in SCORE_FUNCTIONS:
        raise ValueError(f"score_fn={score_fn!r}; choose one of {SCORE_FUNCTIONS}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"experts_per_token={k} must be in [1, num_experts={num_experts}]")
    logits = logits.astype(jnp.float32)
    if score_fn == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdims=True)
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    _, experts = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if normalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * scale
    assignments = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).reshape(-1, num_experts)
    load = assignments.mean(0)
    mean_prob = probs.reshape(-1, num_experts).mean(0)
    return Routing(
        experts=experts.astype(jnp.int32),
        weights=weights,
        load=load,
        aux_loss=num_experts * jnp.sum(load * mean_prob),
        z_loss=jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
    )


@jax.custom_vjp
def balance_probe(bias: jax.Array, load: jax.Array) -> jax.Array:
    """A zero-valued loss term whose gradient for ``bias: [E]`` is ``BIAS_PROBE_SCALE * (load
    - 1/E)`` times its cotangent: the DeepSeek-V3 update direction (module doc)."""
    del bias, load
    return jnp.zeros((), jnp.float32)


def _probe_fwd(bias, load):
    return balance_probe(bias, load), (bias, load)


def _probe_bwd(residuals, cotangent):
    bias, load = residuals
    direction = BIAS_PROBE_SCALE * (load - 1.0 / load.shape[-1])
    return (cotangent * direction).astype(bias.dtype), jnp.zeros_like(load)


balance_probe.defvjp(_probe_fwd, _probe_bwd)


def route_router_bias(
    optimizer: optax.GradientTransformation, rate: float
) -> optax.GradientTransformation:
    """``optimizer`` for every parameter except the balancing biases (leaves named
    ``ROUTER_BIAS``), which move by ``-rate * sign(gradient)`` and nothing else: no Adam
    moments, no weight decay, no learning-rate schedule (DeepSeek-V3's update speed)."""
    bias_update = optax.chain(optax.scale_by_sign(), optax.scale(-rate))

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "router_bias" if path_keys(path)[-1] == ROUTER_BIAS else "rest",
            params,
        )

    return optax.multi_transform({"rest": optimizer, "router_bias": bias_update}, labels)


# -- experts --------------------------------------------------------------------------------
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x: [m, a]`` (rows grouped by expert, in order) times ``w: [E, a, b]`` per group ->
    ``[m, b]`` in ``x.dtype``; ``group_sizes: [E]`` int32 sum to at most ``m`` and rows past
    the last group come out zero.

    The one place the layer multiplies by its experts: ``pallas_kernels.moe.gmm`` (Pallas
    kernels on GPU/TPU, ``lax.ragged_dot`` on CPU), given the weights as stored (it casts
    them to ``x.dtype`` tile by tile; a cast copy here would be what its backward saves).
    """
    return gmm(x, w, group_sizes)


def expert_mlp(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    group_sizes: jax.Array,
    matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] = grouped_matmul,
) -> jax.Array:
    """SwiGLU per expert on grouped rows: ``x: [m, d]``, ``w_gate, w_up: [E, d, f]``,
    ``w_down: [E, f, d]``, ``group_sizes: [E]`` -> ``[m, d]``. ``matmul`` is the grouped
    matmul (``grouped_matmul``; ``benchmarks/moe.py`` passes others)."""
    gate = matmul(x, w_gate, group_sizes)
    up = matmul(x, w_up, group_sizes)
    return matmul(nn.silu(gate) * up, w_down, group_sizes)


def expert_capacity(
    tokens: int, k: int, num_experts: int, capacity_factor: float | None
) -> int | None:
    """Assignments an expert takes from a group of ``tokens`` (None: dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


class Dispatch(NamedTuple):
    """How ``A`` assignments are laid out for the grouped matmul."""

    order: jax.Array
    """``[A]``: assignment indices, kept ones grouped by expert, dropped ones last."""
    group_sizes: jax.Array
    """``[E]`` int32: kept assignments per expert."""
    keep: jax.Array | None
    """``[A]`` bool in assignment order (None: dropless, all kept)."""


def sort_by_expert(experts: jax.Array, num_experts: int, capacity: int | None) -> Dispatch:
    """Group the assignments ``experts: [A]`` (flattened ``[t, k]``) by expert, stably; with a
    ``capacity``, each expert keeps its first ``capacity`` assignments."""
    order = jnp.argsort(experts, stable=True)
    counts = jnp.zeros(num_experts, jnp.int32).at[experts].add(1)
    if capacity is None:
        return Dispatch(order, counts, None)
    sorted_experts = experts[order]
    rank = jnp.arange(experts.shape[0]) - (jnp.cumsum(counts) - counts)[sorted_experts]
    kept = rank < capacity
    regroup = jnp.argsort(jnp.where(kept, sorted_experts, num_experts), stable=True)
    keep = jnp.zeros(experts.shape, bool).at[order].set(kept)
    return Dispatch(order[regroup], jnp.minimum(counts, capacity), keep)


def combine(rows: jax.Array, dispatch: Dispatch, weights: jax.Array) -> jax.Array:
    """Expert outputs ``rows: [A, d]`` in dispatch order -> ``[t, d]``: back to assignment
    order and summed with ``weights: [t, k]`` (dropped assignments weigh 0)."""
    t, k = weights.shape
    positions = jnp.arange(rows.shape[0], dtype=jnp.int32)
    inverse = jnp.zeros_like(positions).at[dispatch.order].set(positions)
    out = rows[inverse].reshape(t, k, -1).astype(jnp.float32)
    if dispatch.keep is not None:
        weights = jnp.where(dispatch.keep.reshape(t, k), weights, 0.0)
    return jnp.einsum("tkd,tk->td", out, weights.astype(jnp.float32)).astype(rows.dtype)


def routed_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    capacity_factor: float | None = None,
) -> jax.Array:
    """The dropless (or capacity-bounded) expert mixture on one device: ``x: [t, d]``,
    ``experts, weights: [t, k]``, expert weights ``[E, d, f]`` / ``[E, f, d]`` -> ``[t, d]``."""
    t, k = experts.shape
    num_experts = w_gate.shape[0]
    capacity = expert_capacity(t, k, num_experts, capacity_factor)
    dispatch = sort_by_expert(experts.reshape(-1), num_experts, capacity)
    rows = expert_mlp(x[dispatch.order // k], w_gate, w_up, w_down, dispatch.group_sizes)
    return combine(rows, dispatch, weights)


# -- expert-parallel exchange -----------------------------------------------------------------
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


# -- the layer --------------------------------------------------------------------------------
class Experts(nn.Module):
    """The stacked expert weights: ``gate, up: [E, d, f]``, ``down: [E, f, d]`` (each expert
    initialised like a ``Dense`` kernel)."""

    num_experts: int
    intermediate_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=(0,)
        )
        e, f = self.num_experts, self.intermediate_size
        gate = self.param("gate", init, (e, width, f), self.param_dtype)
        up = self.param("up", init, (e, width, f), self.param_dtype)
        down = self.param("down", init, (e, f, width), self.param_dtype)
        return gate, up, down


class MoE(nn.Module):
    """Mixture-of-experts SwiGLU: x ``[b, s, d]`` -> ``[b, s, d]`` (module doc).

    Parameters: ``router/kernel [d, E]``, ``experts/{gate, up} [E, d, f]``,
    ``experts/down [E, f, d]``, with ``score_bias`` also ``score_bias [E]``, with a shared
    expert ``shared/{gate, up, down}/kernel`` and with its gate ``shared_gate/kernel [d, 1]``.
    Sows ``loss``, ``aux_loss``, ``z_loss`` and ``load`` into ``MOE_COLLECTION`` when that
    collection is mutable.
    """

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    score_fn: str = "softmax"
    """``softmax`` or ``sigmoid`` routing scores."""
    normalize_weights: bool = True
    """Renormalise the k routing weights to sum to 1."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routing weights (DeepSeek-V3)."""
    score_bias: bool = False
    """Add the aux-loss-free balancing bias ``score_bias`` to the scores for selection."""
    capacity_factor: float | None = None
    """None: dropless; else each expert takes at most ``cf * t * k / E`` assignments."""
    shared_intermediate_size: int = 0
    """Width of the always-on shared expert (0: none)."""
    shared_gate: bool = False
    """Scale the shared expert by ``sigmoid(x @ shared_gate)`` (Qwen2-MoE)."""
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    exchange: str = "auto"
    """Expert-parallel exchange: ``ragged`` (``lax.ragged_all_to_all``), ``padded`` or
    ``auto`` (padded on CPU, ragged elsewhere)."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        num_experts, d = self.num_experts, x.shape[-1]
        logits = nn.Dense(
            num_experts,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            dot_general=dense_dot_general,
            name="router",
        )(x.astype(jnp.float32))
        bias = None
        if self.score_bias:
            bias = self.param(ROUTER_BIAS, nn.initializers.zeros, (num_experts,), self.param_dtype)
        routing = route(
            logits,
            self.experts_per_token,
            score_fn=self.score_fn,
            normalize=self.normalize_weights,
            scale=self.routed_scaling_factor,
            bias=bias,
        )
        stacked = Experts(num_experts, self.intermediate_size, self.param_dtype, name="experts")(d)
        y = dispatch_experts(
            x,
            routing.experts,
            routing.weights,
            *stacked,
            capacity_factor=self.capacity_factor,
            exchange=self.exchange,
        )
        if self.shared_intermediate_size:
            shared = SwiGLU(
                self.shared_intermediate_size, self.dtype, self.param_dtype, name="shared"
            )(x)
            if self.shared_gate:
                gate = nn.Dense(
                    1,
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    dot_general=dense_dot_general,
                    name="shared_gate",
                )(x)
                shared = shared * nn.sigmoid(gate)
            y = y + shared
        loss = self.aux_loss_weight * routing.aux_loss + self.z_loss_weight * routing.z_loss
        if bias is not None:
            loss = loss + balance_probe(bias, routing.load)
        for name, value in (
            ("loss", loss),
            ("aux_loss", routing.aux_loss),
            ("z_loss", routing.z_loss),
            ("load", routing.load),
        ):
            self.sow(MOE_COLLECTION, name, value)
        return y.astype(self.dtype)


# -- collecting the sown values ---------------------------------------------------------------
class MoESummary(NamedTuple):
    """The MoE layers' sown values over a model, as the LM loss uses and reports them."""

    loss: jax.Array
    """``[]``: the weighted aux + z losses (and balancing probes), mean over MoE layers."""
    aux_loss: jax.Array
    """``[]``: mean over MoE layers."""
    z_loss: jax.Array
    """``[]``: mean over MoE layers."""
    load: jax.Array
    """``[layers, E]``: each MoE layer's fraction of assignments per expert."""

    def metrics(self) -> dict[str, jax.Array]:
        """``aux_loss``, ``z_loss``, ``expert_load`` (``[E]``, mean over layers) and
        ``expert_load_max`` (the busiest expert's load over the mean load, worst layer: 1.0
        is perfectly balanced)."""
        return {
            "aux_loss": self.aux_loss,
            "z_loss": self.z_loss,
            "expert_load": self.load.mean(0),
            "expert_load_max": (self.load.max(-1) * self.load.shape[-1]).max(),
        }


def moe_summary(collection: Any) -> MoESummary | None:
    """Collect what every ``MoE`` layer sowed (``variables[MOE_COLLECTION]`` of an
    ``apply(..., mutable=[MOE_COLLECTION])``, scanned layers included); None when no layer
    sowed anything (a dense model)."""
    found: dict[str, list[jax.Array]] = {"loss": [], "aux_loss": [], "z_loss": [], "load": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
        name = next((key for key in reversed(path_keys(path)) if key in found), None)
        if name is not None:
            found[name].append(leaf)
    if not found["loss"]:
        return None
    flat = {
        name: jnp.concatenate([v.reshape(-1) for v in values])
        for name, values in found.items()
        if name != "load"
    }
    num_experts = found["load"][0].shape[-1]
    load = jnp.concatenate([v.reshape(-1, num_experts) for v in found["load"]])
    return MoESummary(
        loss=flat["loss"].mean(),
        aux_loss=flat["aux_loss"].mean(),
        z_loss=flat["z_loss"].mean(),
        load=load,
    )
