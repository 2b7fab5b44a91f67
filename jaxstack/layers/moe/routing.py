"""The MoE router: top-k routing, its balancing losses, and auxiliary-loss-free balancing.

**Losses** (``Routing``; the layer sows them into ``MOE_COLLECTION``): ``aux_loss = E * sum_i
f_i * P_i`` (``f_i`` the fraction of assignments routed to expert ``i``, ``P_i`` its mean
routing probability; 1.0 when balanced), ``z_loss = mean(logsumexp(logits)**2)`` (ST-MoE),
``load = f``.

**Auxiliary-loss-free balancing** (DeepSeek-V3): a per-expert ``score_bias`` is added to the
scores for the top-k choice only. It is a parameter that no loss moves: its "gradient" is
defined by ``balance_probe`` (a zero-valued term of the layer's loss) as ``load - 1/E``
(scaled by ``BIAS_PROBE_SCALE`` so that it is invisible in the gradient norm), and
``route_router_bias`` hands it to ``b -= rate * sign(gradient)`` instead of the LM
optimizer: overloaded experts become less attractive, underloaded ones more.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharding_rules.paths import path_keys

ROUTER_BIAS = "score_bias"
"""Name of the aux-loss-free balancing bias parameter (``route_router_bias`` finds it)."""
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BIAS_PROBE_SCALE = 1e-6
"""The balancing bias's pseudo-gradient is ``BIAS_PROBE_SCALE * (load - 1/E)``; its sign is
what moves the bias, so the scale only keeps it out of the gradient norm and clipping."""


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
