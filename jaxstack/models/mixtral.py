"""Mixture-of-experts decoders (Mixtral, Qwen2/3-MoE shapes, DeepSeek-V3 routing) on the Llama
blocks: config, presets, the MoE block, active-parameter counts and FLOPs.

``MixtralConfig`` extends ``LlamaConfig`` with the experts, the router and which layers are
MoE: layer ``i`` is when ``i >= first_dense_layers`` and ``(i - first_dense_layers + 1) %
moe_every == 0`` (every layer by default; ``first_dense_layers=3`` is DeepSeek-V3's dense
start, ``moe_every=2`` Qwen2-MoE's ``decoder_sparse_step=2``). Other layers keep Llama's
dense SwiGLU of ``intermediate_size``. Attention, norms, embeddings and the head are
Llama's, with the same parameter names.

Parameters of an MoE layer's ``mlp`` (``jaxstack.layers.moe.MoE``), laid out so a Hugging
Face key map is one line per tensor: ``router/kernel [d, E]`` (HF ``gate.weight`` is
``[E, d]``), ``experts/gate``, ``experts/up`` ``[E, d, f]`` and ``experts/down [E, f, d]``
(HF's per-expert ``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/``down_proj``, stacked and
transposed), ``score_bias [E]`` (DeepSeek-V3 ``e_score_correction_bias``),
``shared/{gate,up,down}/kernel`` (the shared expert(s)) and ``shared_gate/kernel [d, 1]``
(Qwen2-MoE ``shared_expert_gate``).
"""

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from jaxstack.layers.moe import EXCHANGES, SCORE_FUNCTIONS, MoE
from jaxstack.models.llama import PRESETS as LLAMA_PRESETS
from jaxstack.models.llama import (
    Block,
    HFTensor,
    LayerTensor,
    Llama,
    LlamaConfig,
    hf_attention_tensors,
    hf_decoder_config,
    hf_decoder_fields,
    hf_mlp_tensors,
    hf_model_tensors,
    hf_required,
)


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    """A Llama-family decoder whose MLPs are mixtures of experts on all or some layers.

    ``intermediate_size`` is the width of the dense layers' MLP (if any).
    """

    num_experts: int = 8
    """Routed experts per MoE layer (``E``)."""
    experts_per_token: int = 2
    """Experts each token is routed to (``k``)."""
    expert_intermediate_size: int = 14336
    """SwiGLU width of each routed expert (``f``)."""
    shared_intermediate_size: int = 0
    """SwiGLU width of the always-on shared expert(s), 0 for none (n shared experts of width
    f are one of width n*f)."""
    shared_expert_gate: bool = False
    """Scale the shared expert by ``sigmoid(x @ w)`` per token (Qwen2-MoE)."""
    router_score: str = "softmax"
    """``softmax`` (Mixtral, Qwen-MoE) or ``sigmoid`` (DeepSeek-V3) routing scores."""
    normalize_router_weights: bool = True
    """Renormalise each token's k routing weights to sum to 1 (Mixtral, Qwen3-MoE,
    DeepSeek-V3; Qwen2-MoE does not)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routing weights (DeepSeek-V3: 2.5)."""
    router_bias_rate: float = 0.0
    """> 0: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores for
    the top-k choice, moved by ``-rate * sign(load - mean load)`` each update (DeepSeek uses
    0.001). Needs the optimizer wrapped by ``jaxstack.layers.moe.route_router_bias``
    (``jaxstack train`` does it)."""
    capacity_factor: float | None = None
    """None: dropless. Else each expert takes at most ``capacity_factor * tokens * k / E``
    assignments of a device's tokens; the rest are dropped."""
    router_aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss ``E * sum(f_i * P_i)`` (1.0 when balanced; HF's
    Mixtral/Qwen losses count ``f`` per token rather than per assignment, k times larger)."""
    router_z_loss_weight: float = 0.001
    """Weight of the router z-loss ``mean(logsumexp(router logits)**2)``."""
    first_dense_layers: int = 0
    """Layers before the first MoE layer keep the dense MLP."""
    moe_every: int = 1
    """After ``first_dense_layers``, every ``moe_every``-th layer is MoE (the others dense)."""
    expert_exchange: str = "auto"
    """Expert-parallel token exchange: ``ragged`` (``lax.ragged_all_to_all``), ``padded``
    (``all_to_all`` of worst-case buffers) or ``auto`` (padded on CPU, ragged elsewhere)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1 or not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}: "
                "need 1 <= experts_per_token <= num_experts"
            )
        if self.router_score not in SCORE_FUNCTIONS:
            raise ValueError(f"router_score={self.router_score!r}; choose one of {SCORE_FUNCTIONS}")
        if self.expert_exchange not in EXCHANGES:
            raise ValueError(f"expert_exchange={self.expert_exchange!r}; choose one of {EXCHANGES}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (or None)")
        for name in (
            "router_bias_rate",
            "router_aux_loss_weight",
            "router_z_loss_weight",
            "shared_intermediate_size",
            "first_dense_layers",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be >= 1")
        if not self.moe_layers:
            raise ValueError(
                f"no layer is MoE (num_layers={self.num_layers}, first_dense_layers="
                f"{self.first_dense_layers}, moe_every={self.moe_every}); use LlamaConfig"
            )
        if self.scan_layers and len(self.moe_layers) != self.num_layers:
            raise ValueError(
                "scan_layers stacks identical layers: every layer must be MoE (first_dense_layers"
                f"=0, moe_every=1), got MoE layers {self.moe_layers}; set scan_layers=False"
            )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has the MoE MLP."""
        start = self.first_dense_layers
        return layer >= start and (layer - start + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The MoE layers' indices."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def moe_matmul_params(self, active: bool) -> int:
        """Matmul weights of one MoE MLP: the router, the routed experts (all, or the ``k``
        a token uses when ``active``), the shared expert and its gate."""
        d, e, k = self.hidden_size, self.num_experts, self.experts_per_token
        routed = (k if active else e) * 3 * d * self.expert_intermediate_size
        shared = 3 * d * self.shared_intermediate_size
        return d * e + routed + shared + (d if self.shared_expert_gate else 0)

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameter count from the config; ``active``: only those one token uses (the
        ``experts_per_token`` routed experts of each MoE layer, not all ``num_experts``)."""
        moe = len(self.moe_layers)
        dense_mlp = 3 * self.hidden_size * self.intermediate_size
        bias = self.num_experts if self.router_bias_rate > 0 else 0
        per_moe_layer = self.moe_matmul_params(active) + bias - dense_mlp
        return super().num_params(include_embedding) + moe * per_moe_layer

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """``LlamaConfig.flops_per_token`` with each MoE layer's MLP counted by its active
        weights (router, k routed experts, shared expert and gate)."""
        dense_mlp = 3 * self.hidden_size * self.intermediate_size
        extra = len(self.moe_layers) * (self.moe_matmul_params(active=True) - dense_mlp)
        return super().flops_per_token(seq_len, training) + 2 * extra * (3 if training else 1)


def _with_experts(dense: LlamaConfig, **fields) -> MixtralConfig:
    """``dense``'s config as a ``MixtralConfig``, with ``fields`` (the experts) set."""
    return MixtralConfig(**{**dataclasses.asdict(dense), **fields})


PRESETS: dict[str, MixtralConfig] = {
    # the dense presets' attention and widths, with experts in the MLPs
    "tiny-moe": _with_experts(
        LLAMA_PRESETS["tiny"], num_experts=8, experts_per_token=2, expert_intermediate_size=128
    ),
    "mixtral-8x7b": _with_experts(
        LLAMA_PRESETS["mistral-7b"],
        num_experts=8,
        experts_per_token=2,
        expert_intermediate_size=14336,
        rope_theta=1e6,
        sliding_window=None,
    ),
    "qwen2-moe-a2.7b": MixtralConfig(  # Qwen1.5-MoE-A2.7B: 60 experts, gated shared expert
        vocab_size=151936,
        hidden_size=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        intermediate_size=5632,
        qkv_bias=True,
        num_experts=60,
        experts_per_token=4,
        expert_intermediate_size=1408,
        shared_intermediate_size=5632,
        shared_expert_gate=True,
        normalize_router_weights=False,
        router_aux_loss_weight=0.001,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_seq_len=8192,
    ),
    "qwen3-30b-a3b": MixtralConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=6144,
        qk_norm=True,
        num_experts=128,
        experts_per_token=8,
        expert_intermediate_size=768,
        router_aux_loss_weight=0.001,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_seq_len=40960,
    ),
}


def moe_layer(config: MixtralConfig) -> MoE:
    """The ``MoE`` MLP of ``config``'s MoE layers, named ``mlp``."""
    return MoE(
        num_experts=config.num_experts,
        experts_per_token=config.experts_per_token,
        intermediate_size=config.expert_intermediate_size,
        score_fn=config.router_score,
        normalize_weights=config.normalize_router_weights,
        routed_scaling_factor=config.routed_scaling_factor,
        score_bias=config.router_bias_rate > 0,
        capacity_factor=config.capacity_factor,
        shared_intermediate_size=config.shared_intermediate_size,
        shared_gate=config.shared_expert_gate,
        aux_loss_weight=config.router_aux_loss_weight,
        z_loss_weight=config.router_z_loss_weight,
        exchange=config.expert_exchange,
        dtype=jnp.dtype(config.dtype),
        name="mlp",
    )


class MoEBlock(Block):
    """The Llama block with the MoE MLP."""

    def feed_forward(self) -> MoE:
        return moe_layer(self.config)


class Mixtral(Llama):
    """The Llama decoder with ``MoEBlock`` on ``config.moe_layers``; same call signature.

    ``apply(..., mutable=[MOE_COLLECTION])`` also returns what the MoE layers sowed
    (``jaxstack.layers.moe.moe_summary`` collects it; ``jaxstack.lm`` adds it to the loss).
    """

    config: MixtralConfig

    def block_type(self, layer: int) -> type[Block]:
        return MoEBlock if self.config.is_moe_layer(layer) else Block


# ------------------------------------------------------------------------------------------
# Hugging Face round-trip: Mixtral, Qwen2-MoE and Qwen3-MoE (used by jaxstack.hf).
# ------------------------------------------------------------------------------------------

HF_ARCHITECTURES: dict[str, str] = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
"""HF ``model_type`` -> the ``architectures`` entry this family reads and writes."""
HF_ATTENTION = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
"""The dense model type whose attention each MoE model type has."""


def config_from_hf(hf: dict) -> MixtralConfig:
    """The ``MixtralConfig`` of a Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE ``config.json``.

    HF's load-balancing loss counts each expert's tokens per token rather than per
    assignment (``k`` times ours), so ``router_aux_loss_weight`` is ``router_aux_loss_coef *
    k``; HF has no router z-loss, so its weight is 0.

    Raises:
        ValueError: as ``jaxstack.models.llama.config_from_hf``, or MoE layers that are not a
            dense prefix followed by every n-th layer, or no experts.
    """
    model_type = hf.get("model_type")
    fields = hf_decoder_fields(hf, HF_ARCHITECTURES, HF_ATTENTION.get(model_type, "llama"))
    k = hf_required(hf, "num_experts_per_tok")
    moe = dict(
        experts_per_token=k,
        router_aux_loss_weight=hf.get("router_aux_loss_coef", 0.0) * k,
        router_z_loss_weight=0.0,
    )
    if model_type == "mixtral":
        moe.update(
            num_experts=hf_required(hf, "num_local_experts"),
            expert_intermediate_size=fields["intermediate_size"],
        )
    else:
        first_dense, every = _moe_layers_from_hf(hf, fields["num_layers"])
        shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
        moe.update(
            num_experts=hf.get("num_experts") or hf_required(hf, "num_local_experts"),
            expert_intermediate_size=hf_required(hf, "moe_intermediate_size"),
            normalize_router_weights=bool(hf.get("norm_topk_prob", False)),
            shared_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            first_dense_layers=first_dense,
            moe_every=every,
        )
    return MixtralConfig(**fields, **moe)


def _moe_layers_from_hf(hf: dict, num_layers: int) -> tuple[int, int]:
    """``(first_dense_layers, moe_every)`` of Qwen-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step`` (layer i is MoE when not in the list and ``(i + 1) % step == 0``)."""
    every = hf.get("decoder_sparse_step") or 1
    dense = sorted(hf.get("mlp_only_layers") or [])
    wanted = [i for i in range(num_layers) if i not in dense and (i + 1) % every == 0]
    first = len(dense)
    ours = [i for i in range(num_layers) if i >= first and (i - first + 1) % every == 0]
    if dense != list(range(first)) or ours != wanted or not wanted:
        raise ValueError(
            f"config.json's MoE layers {wanted} (mlp_only_layers={dense}, decoder_sparse_step="
            f"{every}) are not first dense layers followed by every n-th layer, which is what "
            "MixtralConfig expresses (first_dense_layers, moe_every)"
        )
    return first, every


def config_to_hf(config: MixtralConfig, dtype: str = "float32") -> dict:
    """A Hugging Face ``config.json`` dict for ``config`` (tensors stored as ``dtype``).

    The model type is ``config.extra["hf_model_type"]`` when set, else qwen2_moe with a
    shared expert, qwen3_moe with QK norm, mixtral otherwise. Training-only fields
    (``capacity_factor``, ``router_z_loss_weight``, ``expert_exchange``) are not written.

    Raises:
        ValueError: the config has a feature that model type cannot express (sigmoid routing
            or a balancing bias, a routed scaling factor, an ungated shared expert, ...).
    """
    model_type = hf_model_type(config)
    hf = hf_decoder_config(config, dtype, model_type, HF_ARCHITECTURES, HF_ATTENTION[model_type])
    k = config.experts_per_token
    hf.update(
        num_experts_per_tok=k,
        router_aux_loss_coef=config.router_aux_loss_weight / k,
        output_router_logits=False,
    )
    if model_type == "mixtral":
        hf.update(
            num_local_experts=config.num_experts,
            intermediate_size=config.expert_intermediate_size,
            router_jitter_noise=0.0,
        )
        return hf
    hf.update(
        num_experts=config.num_experts,
        moe_intermediate_size=config.expert_intermediate_size,
        norm_topk_prob=config.normalize_router_weights,
        decoder_sparse_step=config.moe_every,
        mlp_only_layers=list(range(config.first_dense_layers)),
    )
    if model_type == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = config.shared_intermediate_size
    return hf


def hf_model_type(config: MixtralConfig) -> str:
    """The HF model type ``config`` is written as (see ``config_to_hf``).

    Raises:
        ValueError: as ``config_to_hf``.
    """
    shared = config.shared_intermediate_size > 0
    inferred = "qwen2_moe" if shared else "qwen3_moe" if config.qk_norm else "mixtral"
    model_type = config.extra.get("hf_model_type") or inferred
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"extra['hf_model_type']={model_type!r}; choose one of {sorted(HF_ARCHITECTURES)}"
        )
    every_layer = config.moe_layers == tuple(range(config.num_layers))
    hf_layers = tuple(
        i
        for i in range(config.num_layers)
        if i >= config.first_dense_layers and (i + 1) % config.moe_every == 0
    )
    expected = {
        "router_score": ("softmax", True),
        "router_bias_rate": (0.0, True),
        "routed_scaling_factor": (1.0, True),
        "normalize_router_weights": (True, model_type == "mixtral"),
        "shared_intermediate_size": (0, model_type != "qwen2_moe"),
        "shared_expert_gate": (True, model_type == "qwen2_moe"),
    }
    for name, (value, applies) in expected.items():
        if applies and getattr(config, name) != value:
            raise ValueError(
                f"{name}={getattr(config, name)!r} cannot be written as HF model_type "
                f"{model_type!r} (which needs {name}={value!r})"
            )
    if (model_type == "mixtral" and not every_layer) or hf_layers != config.moe_layers:
        raise ValueError(
            f"MoE layers {config.moe_layers} (first_dense_layers={config.first_dense_layers}, "
            f"moe_every={config.moe_every}) cannot be written as HF model_type {model_type!r}"
            + (" (every layer is MoE)" if model_type == "mixtral" else "")
        )
    return model_type


def hf_tensors(config: MixtralConfig) -> list[HFTensor]:
    """Every parameter of ``Mixtral(config)`` with its Hugging Face tensor(s) and layout: an
    expert weight ``[E, ...]`` is the E per-expert HF tensors stacked."""
    model_type = hf_model_type(config)
    attention = hf_attention_tensors(config)
    moe = _moe_tensors(config, model_type)
    dense = hf_mlp_tensors(config.hidden_size, config.intermediate_size)
    return hf_model_tensors(
        config, lambda layer: attention + (moe if config.is_moe_layer(layer) else dense)
    )


def _moe_tensors(config: MixtralConfig, model_type: str) -> list[LayerTensor]:
    d, f, e = config.hidden_size, config.expert_intermediate_size, config.num_experts
    if model_type == "mixtral":
        prefix, (gate, up, down) = "block_sparse_moe", ("w1", "w3", "w2")
    else:
        prefix, (gate, up, down) = "mlp", ("gate_proj", "up_proj", "down_proj")
    per_expert = lambda name: tuple(f"{prefix}.experts.{j}.{name}.weight" for j in range(e))  # noqa: E731
    tensors = [
        (("mlp", "router", "kernel"), f"{prefix}.gate.weight", (e, d), 1),
        (("mlp", "experts", "gate"), per_expert(gate), (f, d), 1),
        (("mlp", "experts", "up"), per_expert(up), (f, d), 1),
        (("mlp", "experts", "down"), per_expert(down), (d, f), 1),
    ]
    if config.shared_intermediate_size:
        shared = config.shared_intermediate_size
        tensors += hf_mlp_tensors(d, shared, f"{prefix}.shared_expert", ("mlp", "shared"))
        tensors.append(
            (("mlp", "shared_gate", "kernel"), f"{prefix}.shared_expert_gate.weight", (1, d), 1)
        )
    return tensors
