"""Int8 weights for serving: every matmul kernel stored as int8 with one float32 scale per
output channel, so a decode step reads a quarter of float32's weight bytes (half of
bfloat16's).

``quantize_params`` turns each ``Dense`` / ``DenseGeneral`` kernel ``[*in, *out]`` into
``kernel: int8`` plus ``kernel_scale: f32[*out]`` (``scale = max |w| over the inputs / 127``,
round to nearest), the untied LM head included; embeddings, norms and biases stay as they
are. ``dense_interceptor`` makes those modules compute with the int8 kernels, and ``matmul``
is the product itself:

* on CPU as one int8 x int8 -> int32 dot: XLA's CPU backend does not fuse a dequantize
  into a dot (an int8 -> float convert before the dot costs more than the float32 product
  it replaces), while its int8 dot runs on the int8 bytes. The activations enter it as two
  int8 parts per row (``_int8_product``), about 15 bits: the error stays the weights';
* elsewhere the int8 kernel is converted to the activation dtype inside the dot (GPU and
  TPU compilers fuse the convert into the matmul) and the output scaled per channel.

Per-channel rounding moves each weight by at most half its channel's scale, so a product's
error is at most ``sum_i |x_i| * scale_j / 2``, plus on CPU the activations' (255 times
smaller); tests/serve/test_quantize.py checks that bound and the logits.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import platform

MODES = ("none", "int8")
"""``quantize=`` values: ``none`` serves the weights as they are."""
SCALE = "kernel_scale"
"""Name of a quantized module's per-output-channel scales, beside its int8 ``kernel``."""
_INT8_MAX = 127.0
LO_STEPS = 254.0
"""The low int8 part of an activation counts steps of ``1 / LO_STEPS`` of the high part's."""


def quantize_kernel(kernel: jax.Array, num_in: int) -> tuple[jax.Array, jax.Array]:
    """``(int8 kernel, f32 scale[*out])`` of ``kernel [*in, *out]`` whose first ``num_in``
    axes are contracted; a channel of zeros gets scale 1."""
    w = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=tuple(range(num_in))) / _INT8_MAX
    scale = jnp.where(scale == 0.0, 1.0, scale)
    return jnp.round(w / scale).astype(jnp.int8), scale


def quantize_params(params: dict, mode: str = "int8") -> dict:
    """``params`` (a Llama-family tree, with or without the outer ``{"params": ...}``) with
    every matmul kernel in int8 and its ``kernel_scale`` beside it (``mode="none"``: as is).

    A kernel is a ``kernel`` leaf of rank >= 2; its contracted axes are all but the last
    (``Dense``, the q/k/v projections ``[embed, heads, head_dim]`` contract one: see
    ``_num_in``). Raises ValueError for an unknown ``mode``."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return params

    def visit(tree: dict, path: tuple[str, ...]) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = visit(value, (*path, name))
            elif name == "kernel" and value.ndim >= 2:
                out[name], out[SCALE] = quantize_kernel(value, _num_in(path, value.ndim))
            else:
                out[name] = value
        return out

    return visit(params, ())


def _num_in(path: tuple[str, ...], ndim: int) -> int:
    """Contracted axes of the kernel at ``path``: an attention output projection ``o``
    ``[heads, head_dim, embed]`` contracts two, every other kernel its first."""
    return 2 if path and path[-1] == "o" and ndim == 3 else 1


def is_quantized(params: dict) -> bool:
    """Whether ``params`` holds int8 kernels from ``quantize_params``."""
    return any(SCALE in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))


def matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array, num_in: int) -> jax.Array:
    """``x [..., *in] @ dequantize(kernel [*in, *out], scale [*out])`` as float32
    ``[..., *out]`` (module docstring: how each backend computes it)."""
    in_shape, out_shape = kernel.shape[:num_in], kernel.shape[num_in:]
    if x.shape[x.ndim - num_in :] != in_shape:
        raise ValueError(f"x {x.shape} does not end in the kernel's input axes {in_shape}")
    lead = x.shape[: x.ndim - num_in]
    x2 = x.reshape(-1, math.prod(in_shape))
    w2 = kernel.reshape(x2.shape[1], -1)
    if platform.backend() == "cpu":
        y = _int8_product(x2.astype(jnp.float32), w2)
    else:
        y = jnp.dot(x2, w2.astype(x2.dtype), preferred_element_type=jnp.float32)
    return (y * scale.reshape(-1)).reshape(*lead, *out_shape)


def _int8_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [m, k] @ w [k, n]`` (int8), not yet scaled by the kernel's scales, as one
    int8 x int8 -> int32 dot: each row of ``x`` is split into two int8 rows,
    ``x = (hi + lo / LO_STEPS) * max|x| / 127``, stacked as ``[2m, k]``, so the activations
    keep about 15 bits (rounding error at most ``max|x| / (2 * 127 * LO_STEPS)``) while the
    weights are read once. (The two rows also keep XLA off its slow one-row int8 dot.)"""
    rows = x.shape[0]
    x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / _INT8_MAX
    x_scale = jnp.where(x_scale == 0.0, 1.0, x_scale)
    unit = x / x_scale  # in [-127, 127]
    hi = jnp.round(unit)
    lo = jnp.round((unit - hi) * LO_STEPS)  # |unit - hi| <= 1/2: in [-127, 127]
    x8 = jnp.concatenate([hi, lo]).astype(jnp.int8)
    acc = jax.lax.dot(x8, w, preferred_element_type=jnp.int32).astype(jnp.float32)
    return (acc[:rows] + acc[rows:] / LO_STEPS) * x_scale


def dense_interceptor(next_fun, args, kwargs, context):
    """A ``flax.linen.intercept_methods`` interceptor: a ``Dense`` / ``DenseGeneral`` whose
    params hold a ``kernel_scale`` computes with its int8 kernel (``matmul``), the bias added
    after; every other call runs as is."""
    module = context.module
    dense = isinstance(module, nn.Dense | nn.DenseGeneral) and context.method_name == "__call__"
    if not dense or not module.has_variable("params", SCALE):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    scale = module.get_variable("params", SCALE)
    (x,) = args
    num_in = kernel.ndim - scale.ndim
    y = matmul(x, kernel, scale, num_in)
    if module.has_variable("params", "bias"):
        y = y + module.get_variable("params", "bias").astype(jnp.float32)
    return y.astype(module.dtype or x.dtype)


def head_logits(hidden: jax.Array, head_params: dict) -> jax.Array:
    """float32 logits of ``hidden [..., d]`` through a quantized LM head's params
    (``{"kernel": int8, "kernel_scale": f32}``)."""
    return matmul(hidden, head_params["kernel"], head_params[SCALE], 1)
