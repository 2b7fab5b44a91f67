"""The mixture-of-experts feed-forward layer and the summary of what it sows.

``MoE``: x ``[b, s, d]`` -> ``[b, s, d]``, with ``E`` experts of width ``f``, ``k`` per token::

    logits  = x @ router                        [t, E]  float32
    scores  = softmax(logits) or sigmoid(logits)
    experts = top_k(scores + bias, k)           [t, k]  bias: selection only (``routing``)
    weights = scores[experts]  (/ their sum when renormalised) * routed_scaling_factor
    y       = sum_k weights * SwiGLU_expert(x)  (+ shared expert, optionally sigmoid-gated)

The layer sows ``loss`` (the weighted sum of the router's ``aux_loss`` and ``z_loss``),
``aux_loss``, ``z_loss`` and ``load`` into ``MOE_COLLECTION``; ``moe_summary`` collects them.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxstack.layers.dense import dense_dot_general
from jaxstack.layers.mlp import SwiGLU
from jaxstack.layers.moe.expert_parallel import dispatch_experts
from jaxstack.layers.moe.routing import ROUTER_BIAS, balance_probe, route
from sharding_rules.paths import path_keys

MOE_COLLECTION = "moe"
"""The Flax collection the MoE layers sow their losses and load into."""


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
