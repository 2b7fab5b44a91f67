"""The floor of ``train_cpu.py``: the same Llama and training step in plain JAX (jnp + optax).

What an expert writes without a framework: a params dict of 2-D matrices, a forward pass of
``jnp`` ops (RMSNorm, rotate-half RoPE, grouped-query causal attention through
``jax.nn.dot_product_attention``, SwiGLU, untied LM head), the mean token cross-entropy,
``jax.value_and_grad`` and optax's ``clip_by_global_norm`` + ``adamw``, jitted with the
params and optimizer state donated. No jaxstack, flax or sharding code. The architecture and
numerics follow ``jaxstack.models.llama`` (float32 parameters, compute in ``dtype``, norms and
RoPE in float32, float32 logits), so that the same parameters give the same loss
(``params_from_jaxstack``; checked in tests/benchmarks/test_train_cpu.py).

Shapes: ``b`` batch, ``s`` sequence, ``d`` width, ``h`` query heads, ``k`` KV heads, ``e``
head width, ``f`` MLP width, ``v`` vocabulary.

``dots="bf16"`` (bfloat16 compute only) is a route, not the floor: every weight matmul, forward
and backward, takes bfloat16 operands and accumulates in float32 (``bf16_matmul``). XLA:CPU
computes a bfloat16 dot with a bfloat16 result in float32 (it converts the operands), but
hands a bfloat16 x bfloat16 -> float32 dot to YNNPACK's native bfloat16 kernels.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxstack.models.llama import LlamaConfig

Params = dict[str, Any]


def init_params(config: LlamaConfig, key: jax.Array) -> Params:
    """Float32 parameters: normal(``initializer_range``) embedding and head, LeCun-normal
    projections (flax's ``Dense`` default), norm scales of one."""
    d, e, f, v = config.hidden_size, config.head_dim_, config.intermediate_size, config.vocab_size
    h, k = config.num_heads, config.num_kv_heads
    normal = jax.nn.initializers.normal(config.initializer_range)
    lecun = jax.nn.initializers.lecun_normal()
    shapes = {"wq": (d, h * e), "wk": (d, k * e), "wv": (d, k * e), "wo": (h * e, d)}
    shapes.update(w_gate=(d, f), w_up=(d, f), w_down=(f, d))
    keys = iter(jax.random.split(key, 2 + config.num_layers * len(shapes)))
    layers = [
        {
            "attn_norm": jnp.ones((d,)),
            "mlp_norm": jnp.ones((d,)),
            **{name: lecun(next(keys), shape) for name, shape in shapes.items()},
        }
        for _ in range(config.num_layers)
    ]
    embed, head = normal(next(keys), (v, d)), normal(next(keys), (d, v))
    return {"embed": embed, "layers": layers, "final_norm": jnp.ones((d,)), "lm_head": head}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x: [..., d] normalised by its root mean square in float32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x: [b, s, heads, e] by positions: [b, s] (rotate-half layout), in float32."""
    e = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [b, s, 1, e/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x: [..., i] @ w: [i, o] with bfloat16 operands and float32 accumulation, in x.dtype;
    its gradients are computed the same way."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_matmul_fwd(x, w):
    """``bf16_matmul`` keeping its operands for the backward pass."""
    return bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(saved, grad):
    """dx = grad @ w.T and dw = x.T @ grad, each bfloat16 x bfloat16 -> float32 -> dtype."""
    x, w = saved
    grad = grad.astype(x.dtype)
    dx = jnp.matmul(grad, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    x2, grad2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    dw = jnp.matmul(x2.T, grad2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)
DOTS = {"xla": jnp.matmul, "bf16": bf16_matmul}
"""How the weight matmuls are written: ``xla`` as plain ``@`` (the floor), ``bf16`` through
``bf16_matmul``."""


def forward(
    config: LlamaConfig, params: Params, ids: jax.Array, positions: jax.Array, dots: str = "xla"
):
    """ids, positions: [b, s] -> float32 logits [b, s, v]; one causal sequence per row."""
    dtype, eps, e = jnp.dtype(config.dtype), config.rms_norm_eps, config.head_dim_
    if dots not in DOTS or (dots == "bf16" and dtype != jnp.bfloat16):
        raise ValueError(f"dots={dots!r}: choose one of {sorted(DOTS)} (bf16 needs bfloat16)")
    mm = DOTS[dots]
    b, s = ids.shape
    x = params["embed"].astype(dtype)[ids]  # [b, s, d]
    for layer in params["layers"]:
        w = {name: value.astype(dtype) for name, value in layer.items() if name[0] == "w"}
        y = rms_norm(x, layer["attn_norm"], eps)
        q = rope(mm(y, w["wq"]).reshape(b, s, config.num_heads, e), positions, config.rope_theta)
        k = rope(mm(y, w["wk"]).reshape(b, s, -1, e), positions, config.rope_theta)
        v = mm(y, w["wv"]).reshape(b, s, -1, e)
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [b, s, h, e]
        x = x + mm(attn.reshape(b, s, -1), w["wo"])
        y = rms_norm(x, layer["mlp_norm"], eps)
        x = x + mm(jax.nn.silu(mm(y, w["w_gate"])) * mm(y, w["w_up"]), w["w_down"])
    x = rms_norm(x, params["final_norm"], eps)
    return mm(x, params["lm_head"].astype(dtype)).astype(jnp.float32)


def loss_fn(
    config: LlamaConfig, params: Params, batch: dict[str, jax.Array], dots: str = "xla"
) -> jax.Array:
    """Mean next-token cross-entropy over every position of ``batch`` (``input_ids``,
    ``positions``, ``targets``: [b, s])."""
    logits = forward(config, params, batch["input_ids"], batch["positions"], dots)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_step(
    config: LlamaConfig, optimizer: optax.GradientTransformation, dots: str = "xla"
) -> Callable[[Params, optax.OptState, dict], tuple[Params, optax.OptState, jax.Array]]:
    """``step(params, opt_state, batch) -> (params, opt_state, loss)``, jitted; params and
    optimizer state are donated (updated in place)."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(config, p, batch, dots))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def optimizer(learning_rate: float, betas: tuple[float, float], grad_clip: float):
    """Global-norm clipping, then AdamW without weight decay at a constant rate."""
    adamw = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], weight_decay=0.0)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def params_from_jaxstack(config: LlamaConfig, params: Params) -> Params:
    """The parameters of ``jaxstack.models.Llama(config)`` (unrolled layers, untied head)
    in this file's layout: 3-D attention kernels become 2-D matrices, nothing else changes."""
    if config.scan_layers or config.tie_embeddings or config.qkv_bias or config.qk_norm:
        raise ValueError("plain_llama covers unrolled, untied Llama without biases or QK-norm")

    def layer(p: Params) -> Params:
        attn, mlp = p["attn"], p["mlp"]
        to_2d = lambda kernel: kernel.reshape(-1, kernel.shape[-1])  # noqa: E731
        d = attn["q"]["kernel"].shape[0]
        return {
            "attn_norm": p["attn_norm"]["scale"],
            "mlp_norm": p["mlp_norm"]["scale"],
            "wq": attn["q"]["kernel"].reshape(d, -1),
            "wk": attn["k"]["kernel"].reshape(d, -1),
            "wv": attn["v"]["kernel"].reshape(d, -1),
            "wo": to_2d(attn["o"]["kernel"]),
            "w_gate": mlp["gate"]["kernel"],
            "w_up": mlp["up"]["kernel"],
            "w_down": mlp["down"]["kernel"],
        }

    return {
        "embed": params["embed"]["embedding"],
        "layers": [layer(params[f"layers_{i}"]) for i in range(config.num_layers)],
        "final_norm": params["final_norm"]["scale"],
        "lm_head": params["lm_head"]["kernel"],
    }
